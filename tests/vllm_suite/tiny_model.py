"""A tiny Qwen2 model written to disk the way a real checkpoint is: config.json,
safetensors from transformers' save_pretrained, and a byte-level tokenizer built
with `tokenizers`. No weights are downloaded; `seed` decides the weights."""

# The smallest shape vLLM's CPU attention takes (it refuses a head dimension of 16).
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
EOS = "<|endoftext|>"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE without merges: every byte is a token, so any text encodes.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS), len(vocab)


def build(directory: str, seed: int) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer, vocab_size = _tokenizer()
    config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=False, torch_dtype="float32",
                         eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 1, **SHAPE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Larger than the default initialisation, so that greedy choices differ clearly between seeds.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


# Stand-ins for the checkpoints vLLM's own sleep-mode tests name (tests/vllm_upstream): the same
# architectures, tiny, written the way the originals are stored (safetensors or a pytorch .bin).
def _save(model, directory: str, safetensors: bool = True) -> str:
    import torch

    tokenizer, _ = _tokenizer()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
    if safetensors:
        model.save_pretrained(directory)
    else:  # transformers 5 writes safetensors whatever it is asked
        import os

        model.config.architectures = [type(model).__name__]  # save_pretrained would write it; vLLM needs it
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    tokenizer.save_pretrained(directory)
    return directory


def build_llama(directory: str, max_position_embeddings: int = 512, dtype: str = "float32") -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, vocab_size = _tokenizer()
    shape = {**SHAPE, "max_position_embeddings": max_position_embeddings}
    config = LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, torch_dtype=dtype,
                         eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 1, **shape)
    return _save(LlamaForCausalLM(config), directory)


def build_opt(directory: str) -> str:
    """OPT as facebook/opt-125m stores it: pytorch_model.bin, no safetensors."""
    from transformers import OPTConfig, OPTForCausalLM

    _, vocab_size = _tokenizer()
    config = OPTConfig(vocab_size=vocab_size, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                       num_attention_heads=4, word_embed_proj_dim=128, max_position_embeddings=512,
                       torch_dtype="float32", eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 1,
                       pad_token_id=vocab_size - 1)
    return _save(OPTForCausalLM(config), directory, safetensors=False)


def build_qwen3_next(directory: str) -> str:
    """A hybrid model: gated-delta-net (linear attention) layers around a full-attention one, MoE MLPs.
    BF16, as vLLM's CPU gated-delta-net kernels require."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    _, vocab_size = _tokenizer()
    config = Qwen3NextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        # vLLM's CPU gated-delta-rule kernel takes head dimensions of 128 (the real model's), not 32.
        linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, full_attention_interval=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], tie_word_embeddings=False,
        torch_dtype="bfloat16", eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 1)
    return _save(Qwen3NextForCausalLM(config), directory)
