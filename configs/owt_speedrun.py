# GPT-2 small (124M) on OpenWebText with the modded-nanogpt speedrun's techniques switched on:
# configs/owt.py's shape, data and batch, with these changes (each a field, off in owt.py):
#   optimizer = 'muon'        Muon on the blocks' matrices, AdamW on embeddings, head, norms
#   activation = 'relu2'      ReLU squared in the MLP
#   rope = True               rotary positions instead of the learned wpe table
#   qk_norm = True            q and k at unit RMS per head
#   tie_embeddings = False    the LM head has its own weight
#   zero_init_proj = True     the output projections (and the head) start at zero
#   logit_softcap = 30.0      logits bounded to +-30 (forms the full logits: no fused head + loss)
#   lr_schedule = 'wsd'       warmup, flat, then a linear decay over the last 20%
# and a run 10x shorter (modded-nanogpt needs far fewer tokens than nanoGPT's 295B for the same
# loss). target_loss reports the time to nanoGPT's 124M result (~2.85 val loss on OpenWebText).
#
#   torchrun --standalone --nproc_per_node=8 -m fastgpt.train configs/owt_speedrun.py
#
# Not yet measured, neither its loss nor its speed; `bash scripts/gpu_check.sh speedrun` compares
# its tokens/s with configs/owt.py's at one shape on a GPU.

out_dir = "out-owt-speedrun"
eval_interval = 1000
eval_iters = 200
log_interval = 10
target_loss = 2.85  # nanoGPT's 124M result on this data; the run stops there (stop_at_target)

dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8  # 491,520 tokens per step, as configs/owt.py

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
activation = "relu2"
rope = True
qk_norm = True
tie_embeddings = False
zero_init_proj = True
logit_softcap = 30.0

optimizer = "muon"
muon_lr = 0.02  # Muon's own peak rate (Keller Jordan's), scaled by the same schedule as learning_rate
muon_momentum = 0.95
learning_rate = 6e-4  # AdamW's, for the embeddings, the head and the norms
max_iters = 60000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

lr_schedule = "wsd"
warmup_iters = 200
lr_decay_iters = 60000
min_lr = 0.0  # the decay ends at zero, as modded-nanogpt's cooldown does

dtype = "bfloat16"
compile = True
