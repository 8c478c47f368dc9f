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
