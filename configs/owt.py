# GPT-2 small (124M parameters) on OpenWebText, by nanoGPT's recipe (its config/train_gpt2.py):
# ~491k tokens per optimizer step for 600k steps, ~295B tokens in all.
#
#   pip install -e '.[openwebtext]' && python -m fastgpt.prepare openwebtext    # once: -> data/openwebtext/
#   torchrun --standalone --nproc_per_node=8 -m fastgpt.train configs/owt.py    # one node of 8 GPUs
#
# On two nodes of 8 GPUs, run on each (node_rank 0 on the first, 1 on the second; HOST:PORT is
# an address of the first node that both can reach). 16 ranks do not divide the 40 global
# micro-batches, so split the same 491,520 tokens per step as 48 micro-batches of 10 (3 per rank):
#
#   torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:PORT --nproc_per_node=8 \
#       -m fastgpt.train configs/owt.py --gradient_accumulation_steps=48 --batch_size=10
#
# Where jobs are preempted or restarted, add --init_from=auto (resume from out_dir's newest
# checkpoint when there is one) and let torchrun restart lost ranks (see the README on why the
# variable): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts=3 ... --init_from=auto
#
# Result to expect, as nanoGPT's README reports it for its own trainer (not measured with
# fastgpt): val loss ~2.85 after ~4 days on one node of 8x A100 40GB. For scale, OpenAI's
# released GPT-2 124M scores ~3.12 on OpenWebText's val split before finetuning on it (also
# nanoGPT's figure).

out_dir = "out-owt"  # kept apart from the Shakespeare runs' checkpoints
eval_interval = 1000  # 400 eval forwards per 5,000 train micro-steps per GPU: ~3% of the time
eval_iters = 200  # 2.5M tokens per split, a steady estimate (nanoGPT's train_gpt2.py spends 500)
log_interval = 10  # each log line syncs the GPU with the host; once per 10 steps keeps that stall rare

dataset = "openwebtext"  # data/openwebtext/{train,val}.bin from `python -m fastgpt.prepare openwebtext`
batch_size = 12  # sequences per micro-batch: what fits an A100 40GB at block_size 1024 in nanoGPT's runs
block_size = 1024  # GPT-2's context length
# Global, divided among the ranks: 5 micro-batches per GPU on 8 GPUs, 40 x 12 x 1024 = 491,520
# tokens per step, the ~0.5M-token batch of GPT-2 and of GPT-3's 125M model.
gradient_accumulation_steps = 5 * 8  # 8 GPUs x 5 micro-batches each

n_layer = 12  # GPT-2 small's depth
n_head = 12  # 64-wide heads, as GPT-2
n_embd = 768  # GPT-2 small's width: 124M parameters with the 50,257-token embedding
dropout = 0.0  # nanoGPT's pretraining choice: 9B distinct tokens leave little to overfit, dropout slows learning
bias = False  # no biases in Linear/LayerNorm: a bit better and faster than GPT-2's, per nanoGPT

learning_rate = 6e-4  # GPT-3 paper's peak rate for its 125M model
max_iters = 600000  # 600k x 491,520 = ~295B tokens, nanoGPT's budget
weight_decay = 0.1  # GPT-3's decoupled weight decay
beta1 = 0.9  # GPT-3's AdamW betas
beta2 = 0.95  # shorter memory of squared gradients than the default 0.999: steadier at this scale, per GPT-3
grad_clip = 1.0  # GPT-3's global-norm clip; guards against rare loss spikes

warmup_iters = 2000  # linear warmup: Adam's moment estimates settle before the peak rate hits
lr_decay_iters = 600000  # the cosine ends with the run (~max_iters, per Chinchilla)
min_lr = 6e-5  # learning_rate / 10, per Chinchilla

dtype = "bfloat16"  # A100/H100 multiply bf16 natively, and unlike fp16 it needs no loss scaling
compile = True  # torch.compile roughly halved nanoGPT's step time on A100 (~250 -> ~135 ms)
