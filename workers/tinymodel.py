"""Build the tiny local model that `make up` and the tests serve.

A real (if untrained) Llama-architecture model with a real byte-level BPE
tokenizer, so the torch engine runs the same code paths it runs on a hub
model: special tokens, a chat template, left padding, a KV cache. It is built
from the corpus shipped in workers/data/ and a fixed seed, so every machine
builds the same weights without a download; its text is fluent-looking noise.

    python -m workers.tinymodel [PATH]     # default .llmq/models/tiny-llama
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from workers.folders import write_in_place

DEFAULT_PATH = Path(".llmq/models/tiny-llama")
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
VOCAB_SIZE = 2048
CONTEXT = 2048
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, in this order

# One "role: content" line per message, then the assistant cue. It starts with
# the BOS token itself, so text rendered by it is tokenized without special
# tokens (as vLLM and the torch engine do).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any text (not just the corpus's
        # characters) tokenizes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(CORPUS)], trainer)
    bos = tokenizer.token_to_id("<s>")
    # Like Llama's tokenizers: a plain prompt gets BOS prepended.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=CONTEXT,
        # Byte-level BPE decodes exactly; "cleaning" would rewrite " ." to ".".
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = LlamaConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        # The default 0.02 leaves an untrained model's logits nearly flat, and
        # greedy decoding then repeats one token forever; wider weights give
        # varied (if meaningless) output, which is what the tests exercise.
        initializer_range=0.1,
        **ids,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(**ids)
    return model


def build_tiny_model(path: Path, *, force: bool = False) -> Path:
    """Build the model into `path` unless one is there; returns `path`.

    Built in a temporary directory beside `path` and renamed into place, so a
    crashed or interrupted build never leaves a half model that looks whole.
    """
    path = Path(path)
    if (path / "config.json").exists() and not force:
        return path
    def write(folder: Path) -> None:
        tokenizer = _train_tokenizer()
        _build_model(tokenizer).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_in_place(path, write, "building")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        sys.exit("usage: python -m workers.tinymodel [PATH]")
    path = Path(args[0]) if args else DEFAULT_PATH
    if (path / "config.json").exists():
        print(f"{path}: already built")
        return
    started = time.perf_counter()
    build_tiny_model(path)
    print(f"{path}: built in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
