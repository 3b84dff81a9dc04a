# Finetune OpenAI's GPT-2 XL (1.5B parameters) on Shakespeare in GPT-2 BPE, by nanoGPT's recipe
# (its config/finetune_shakespeare.py): 32,768 tokens per step (1 x 32 micro-batches of 1,024),
# 20 steps at a constant 3e-5, about 2 epochs of the corpus's ~302k training tokens.
#
#   python -m fastgpt.prepare shakespeare        # once: -> data/shakespeare/ (GPT-2 BPE)
#   python -m fastgpt.train configs/finetune_shakespeare.py [--hf_dir=FOLDER]
#   python -m fastgpt.sample --out_dir=out-shakespeare --start="ROMEO:"
#
# The weights come from local files only: a Hugging Face folder (--hf_dir) or the local Hugging
# Face cache; on a machine with a network, `huggingface-cli download openai-community/gpt2-xl
# config.json model.safetensors` fills the cache. --init_from=gpt2 (124M) runs the same recipe in
# a fraction of the memory and time.
#
# Result to expect: not yet measured with fastgpt. It needs a GPU: XL's fp32 weights, gradients
# and two AdamW moments alone take 1.56B x 16 bytes = 25 GB; a GPU run's figure belongs here.

out_dir = "out-shakespeare"
eval_interval = 5  # evaluate (and maybe save) every 5 of the 20 steps
eval_iters = 40
always_save_checkpoint = False  # keep only a checkpoint that improves the val loss
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2-xl"

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2; its shape replaces n_layer/n_head/n_embd/bias
batch_size = 1
gradient_accumulation_steps = 32
block_size = 1024  # GPT-2's full context
dropout = 0.0

max_iters = 20
learning_rate = 3e-5  # constant: a finetune this short does not need a schedule
decay_lr = False
compile = "auto"
