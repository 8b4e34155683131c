"""Tiny, randomly initialised text encoders saved as real Hugging Face directories.

They load with ``AutoTokenizer`` / ``AutoModel`` like any checkpoint, need no download, and take a
fraction of a second to build: tests, the demo corpus and CI use them in place of RoBERTa / BERT.
The tokenizers come from a few built-in sentences: RoBERTa-style is byte-level BPE trained on them, with
``<s> A </s></s> B </s>`` pairs; BERT-style is lower-cased WordPiece over their words and letters, with
``[CLS] A [SEP] B [SEP]``. Both are deterministic: the same call writes the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, RobertaConfig, RobertaModel

from erc.errors import ConfigError

TRAINING_SENTENCES = [
    "Chandler: Oh my God, I can't believe you did that!",
    "Monica: What are you doing here? We said seven o'clock.",
    "Joey: How you doin'? I'm just getting some food.",
    "Rachel: No, no, no. That is not what happened at all.",
    "Ross: We were on a break! Everybody knows that.",
    "Phoebe: Okay, well, I think it's really sweet and I love it.",
    "Excuse me, is this the line for the movie tonight?",
    "I'm so sorry, I didn't mean to hurt anyone. Really, I'm fine.",
    "Why would you say something like that to me? That's terrible.",
    "Great news, they gave me the job and we are moving next week!",
    "Well, maybe. I don't know, what do you want to do now?",
    "Yeah, sure, thanks a lot for the help, see you tomorrow.",
]

HIDDEN_SIZE = 32


def _roberta_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator((f" {sentence}" for sentence in TRAINING_SENTENCES), trainer)  # as in running text
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")),
        trim_offsets=False, add_prefix_space=False,
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", model_max_length=512,
    )  # fmt: skip


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    pieces = [pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)) for sentence in TRAINING_SENTENCES]
    words = sorted({word for sentence in pieces for word, _ in sentence})
    characters = sorted({character for word in words for character in word})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{c}" for c in characters), *words]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}  # unseen words fall back to letters
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]", model_max_length=512,
    )  # fmt: skip


def build_tiny_text_encoder(out_dir: Path, style: Literal["roberta", "bert"] = "roberta", seed: int = 0) -> Path:
    """Write a 2-layer, 32-wide encoder and its tokenizer to ``out_dir``; same ``seed`` → same weights."""
    out_dir = Path(out_dir)
    if style == "roberta":
        tokenizer = _roberta_tokenizer()
        config = RobertaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            hidden_size=HIDDEN_SIZE, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        )  # fmt: skip
        model_class = RobertaModel
    elif style == "bert":
        tokenizer = _bert_tokenizer()
        config = BertConfig(
            vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
            hidden_size=HIDDEN_SIZE, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        )  # fmt: skip
        model_class = BertModel
    else:
        raise ConfigError(f"unknown tiny encoder style {style!r} (roberta or bert)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
