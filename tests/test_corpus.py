"""Corpus readers (IEMOCAP, MELD, manifest) and the synthetic media and trees the other tests use."""

from __future__ import annotations

import csv
import re
import shutil
import wave
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from erc.errors import ConfigError, CorpusError, ErcWarning
from erc.pipeline.corpus import (
    MELD_LABELS,
    SPLITS,
    clean_meld_text,
    limit_dialogues,
    load_corpus,
    read_iemocap,
    read_manifest,
    read_meld,
)
from erc.pipeline.synthetic import (
    emotion_voice,
    face_image,
    make_demo_corpus,
    make_meld_tree,
    voiced_signal,
    write_face_video,
)
MELD_CSV_NAMES = ("train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv")
MELD_MISSING_VIDEO = "train/dia1_utt2"  # the video conftest's meld_root leaves out
SIX_CLASSES = ["happy", "sad", "neutral", "angry", "excited", "frustrated"]


def _frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def _audio(path: Path) -> tuple[str, int, int, int]:
    """(codec, rate, channels, decoded samples per channel) of a file's first audio track, via PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.name, stream.rate, stream.channels, samples


# ------------------------------------------------------------------------------------------- IEMOCAP


def test_iemocap_counts_splits_and_excluded_labels(iemocap_root):
    corpus = read_iemocap(iemocap_root)
    assert corpus.name == "iemocap"
    assert corpus.label_names == SIX_CLASSES
    # 5 dialogues x 4 utterances; every third utterance is xxx, the fourth is sur in sessions 1 and 5.
    assert corpus.num_utterances == 13
    assert corpus.excluded == {"sur": 2, "xxx": 5}
    assert [d.dialogue_id for d in corpus.split("train")] == [
        "Ses01F_impro01", "Ses02M_script01_1", "Ses03F_impro01", "Ses04M_script01_1"]
    assert [d.dialogue_id for d in corpus.split("test")] == ["Ses05F_impro01"]
    utterances = [u for d in corpus.dialogues for u in d.utterances]
    assert {u.label for u in utterances} == set(SIX_CLASSES)
    assert len({u.utterance_id for u in utterances}) == len(utterances)
    # the excluded utterances are gone, and so are the transcript's non-utterance lines
    labels_file = (iemocap_root / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt").read_text()
    dropped = re.findall(r"\t(\S+)\t(?:xxx|sur)\t", labels_file)
    assert len(dropped) == 2 and not {u.utterance_id for u in utterances} & set(dropped)
    assert not any("XX" in u.utterance_id or u.text.startswith("[") for u in utterances)


def test_iemocap_order_speakers_and_media(iemocap_root):
    corpus = read_iemocap(iemocap_root)
    for dialogue in corpus.dialogues:
        starts = [u.start for u in dialogue.utterances]
        assert starts == sorted(starts) and len(set(starts)) == len(starts)
        assert [u.index for u in dialogue.utterances] == list(range(len(dialogue)))
        first = dialogue.utterances[0]
        assert first.speaker_index == 0
        for u in dialogue.utterances:
            assert u.speaker == u.utterance_id.rsplit("_", 1)[1][0]
            assert u.speaker_index == (0 if u.speaker == first.speaker else 1)
            session = iemocap_root / f"Session{u.dialogue_id[4]}"
            assert u.video == session / "dialog/avi/DivX" / f"{u.dialogue_id}.avi"
            assert u.audio == session / "sentences/wav" / u.dialogue_id / f"{u.utterance_id}.wav"
            assert u.video.is_file() and u.audio.is_file()
            assert 0 <= u.start < u.end and u.audio_start is None and u.audio_end is None
    script = next(d for d in corpus.dialogues if d.dialogue_id == "Ses02M_script01_1")
    assert [(u.speaker, u.speaker_index) for u in script.utterances] == [("M", 0), ("F", 1), ("M", 0)]
    # the label file lists F before M; time order puts M000 (0.8 s) before F000
    assert [u.utterance_id[-4:] for u in script.utterances] == ["M000", "F000", "M002"]
    transcript = (iemocap_root / "Session2/dialog/transcriptions/Ses02M_script01_1.txt").read_text()
    for u in script.utterances:
        assert re.search(rf"^{u.utterance_id} \[[\d.-]+\]: {re.escape(u.text)}$", transcript, re.MULTILINE)


def test_iemocap_four_classes_merge_excited_into_happy(iemocap_root):
    six = read_iemocap(iemocap_root)
    four = read_iemocap(iemocap_root, label_set="4class")
    assert four.label_names == ["happy", "sad", "neutral", "angry"]
    labels6 = {u.utterance_id: u.label for d in six.dialogues for u in d.utterances}
    labels4 = {u.utterance_id: u.label for d in four.dialogues for u in d.utterances}
    frustrated = [uid for uid, label in labels6.items() if label == "frustrated"]
    assert frustrated and four.excluded == {**six.excluded, "fru": len(frustrated)}
    assert set(labels4) == set(labels6) - set(frustrated)
    for uid, label in labels4.items():
        assert label == {"excited": "happy"}.get(labels6[uid], labels6[uid])
    assert list(labels4.values()).count("happy") == sum(v in ("happy", "excited") for v in labels6.values())
    with pytest.raises(ConfigError, match="7class"):
        read_iemocap(iemocap_root, label_set="7class")


def _iemocap_text_copy(iemocap_root: Path, tmp_path: Path) -> Path:
    """Session 1's transcription and label files only (readers never open media)."""
    root = tmp_path / "IEMOCAP"
    for folder in ("transcriptions", "EmoEvaluation"):
        shutil.copytree(iemocap_root / "Session1/dialog" / folder, root / "Session1/dialog" / folder)
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_iemocap_malformed_files_name_file_and_line(iemocap_root, tmp_path):
    root = _iemocap_text_copy(iemocap_root, tmp_path)
    labels = root / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"
    transcript = root / "Session1/dialog/transcriptions/Ses01F_impro01.txt"
    assert read_iemocap(root).num_utterances == 2

    original = labels.read_text()
    line = original.splitlines().index(next(l for l in original.splitlines() if "_F000\t" in l)) + 1
    _edit(labels, "\tneu\t", "\tzzz\t")
    with pytest.raises(CorpusError, match=rf"Ses01F_impro01.txt: line {line}: unknown emotion code 'zzz'"):
        read_iemocap(root)
    labels.write_text(original.replace("[0.8000 - ", "[0.8x00 - ", 1))
    with pytest.raises(CorpusError, match=rf"EmoEvaluation/Ses01F_impro01.txt: line {line}: malformed"):
        read_iemocap(root)
    labels.write_text(original)

    lines = transcript.read_text().splitlines()
    transcript.write_text("\n".join(l for l in lines if "_M000 " not in l))
    with pytest.raises(CorpusError, match=r"Ses01F_impro01_M000: labelled in .* but missing from"):
        read_iemocap(root)
    transcript.write_text("\n".join(lines).replace("[000.8000-", "[000.8x00-"))
    with pytest.raises(CorpusError, match=r"transcriptions/Ses01F_impro01.txt: line 1: malformed time span"):
        read_iemocap(root)
    transcript.unlink()
    with pytest.raises(CorpusError, match=r"Ses01F_impro01.txt: no transcription file"):
        read_iemocap(root)
    with pytest.raises(CorpusError, match="no Session1..Session5 folders"):
        read_iemocap(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- MELD


def test_meld_real_csv_counts_text_and_paths(meld_csv_dir, tmp_path):
    for name in MELD_CSV_NAMES:
        shutil.copy(meld_csv_dir / name, tmp_path / name)
    corpus = read_meld(tmp_path)
    assert corpus.name == "meld" and corpus.label_names == MELD_LABELS
    counts = {s: (sum(len(d) for d in corpus.split(s)), len(corpus.split(s))) for s in SPLITS}
    assert counts == {"train": (9989, 1038), "dev": (1109, 114), "test": (2610, 280)}
    assert len({d.dialogue_id for d in corpus.dialogues}) == 1038 + 114 + 280
    assert len({u.utterance_id for d in corpus.dialogues for u in d.utterances}) == 9989 + 1109 + 2610
    by_id = {u.utterance_id: u for d in corpus.dialogues for u in d.utterances}
    first = by_id["train/dia0_utt0"]
    assert first.text == "also I was the point person on my company’s transition from the KL-5 to GR-6 system."
    assert by_id["train/dia0_utt4"].text == "My duties? All right."  # double space in the CSV
    assert (first.speaker, first.speaker_index, by_id["train/dia0_utt1"].speaker_index) == ("Chandler", 0, 1)
    assert first.video == first.audio == tmp_path / "train_splits/dia0_utt0.mp4"
    assert by_id["dev/dia0_utt0"].video == tmp_path / "dev_splits_complete/dia0_utt0.mp4"
    assert by_id["test/dia0_utt0"].video == tmp_path / "output_repeated_splits_test/dia0_utt0.mp4"
    # train dia1 skips Utterance_IDs 6 and 7: indices stay 0..n-1, ids keep the CSV's numbers
    dia1 = next(d for d in corpus.dialogues if d.dialogue_id == "train/dia1")
    assert [u.index for u in dia1.utterances] == list(range(7))
    assert dia1.utterances[-1].utterance_id == "train/dia1_utt8"
    texts = [u.text for d in corpus.dialogues for u in d.utterances]
    raw = []
    for name in MELD_CSV_NAMES:
        with (meld_csv_dir / name).open(encoding="utf-8", newline="") as f:
            raw += [row["Utterance"] for row in csv.DictReader(f)]
    for mark in "’‘“”—…é":  # typography survives reading
        assert sum(mark in t for t in texts) == sum(mark in t for t in raw) > 0, mark
    assert not any(re.search(r"[\x80-\x9f]|â€|\s\s", t) for t in texts)
    assert {u.label for d in corpus.dialogues for u in d.utterances} == set(MELD_LABELS)
    assert limit_dialogues(corpus, 3).num_utterances == sum(len(d) for s in SPLITS for d in corpus.split(s)[:3])


def test_clean_meld_text_repairs_encoding_accidents():
    assert clean_meld_text("my company\x92s \x93plan\x94") == "my company’s “plan”"
    assert clean_meld_text("company’s") == "company’s"
    assert clean_meld_text("Oh. \xa0Yeah…") == "Oh. Yeah…"
    assert clean_meld_text("café naïve — “ok”") == "café naïve — “ok”"


def test_meld_csv_saved_as_windows_1252_reads_the_same(meld_root, tmp_path):
    for name in MELD_CSV_NAMES:
        shutil.copy(meld_root / name, tmp_path / name)
    train = tmp_path / "train_sent_emo.csv"
    train.write_bytes(train.read_text(encoding="utf-8").encode("cp1252"))
    texts = [u.text for d in read_meld(tmp_path).split("train") for u in d.utterances]
    assert texts == [u.text for d in read_meld(meld_root).split("train") for u in d.utterances]
    assert any("’" in t for t in texts)


def test_meld_tree_reads_with_missing_and_renamed_videos(meld_root):
    corpus = read_meld(meld_root)
    utterances = [u for d in corpus.dialogues for u in d.utterances]
    # first two dialogues per split, at most 3 rows each: train 3 + 3, dev 2 + 3, test 3 + 3
    assert len(utterances) == 17 and [len(corpus.split(s)) for s in SPLITS] == [2, 2, 2]
    missing = [u for u in utterances if not u.video.exists()]
    assert [u.utterance_id for u in missing] == [MELD_MISSING_VIDEO]
    assert missing[0].video == meld_root / "train_splits/dia1_utt2.mp4"
    renamed = [u for u in utterances if u.video.name.startswith("final_videos_test")]
    assert [u.video.parent.name for u in renamed] == ["output_repeated_splits_test"] and renamed[0].video.exists()
    assert all(u.audio == u.video and u.start is None and u.audio_start is None for u in utterances)


def test_meld_bad_csv_names_file_and_line(meld_root, tmp_path):
    for name in MELD_CSV_NAMES:
        shutil.copy(meld_root / name, tmp_path / name)
    dev = tmp_path / "dev_sent_emo.csv"
    with dev.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    rows[3][3] = "happiness"
    with dev.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(CorpusError, match=r"dev_sent_emo.csv: line 4: unknown emotion 'happiness'"):
        read_meld(tmp_path)
    dev.write_text("Sr No.,Utterance,Speaker,Emotion\n1,Hi,Ross,joy\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"dev_sent_emo.csv: missing column\(s\) Dialogue_ID, Utterance_ID"):
        read_meld(tmp_path)
    (tmp_path / "test_sent_emo.csv").unlink()
    shutil.copy(meld_root / "dev_sent_emo.csv", dev)
    with pytest.raises(CorpusError, match=r"test_sent_emo.csv: missing MELD CSV"):
        read_meld(tmp_path)


def test_meld_tree_media_decode(meld_csv_dir, tmp_path):
    root = make_meld_tree(tmp_path / "MELD.Raw", meld_csv_dir, dialogues_per_split=1, max_utterances=2,
                          missing=["dev/dia0_utt1"])
    videos = sorted(root.glob("*/*.mp4"))
    assert len(videos) == 5 and not (root / "dev_splits_complete/dia0_utt1.mp4").exists()
    assert [v.name for v in videos if v.name.startswith("final_videos_test")] == ["final_videos_testdia0_utt1.mp4"]
    for video in videos:
        frames = _frames(video)
        assert 7 <= len(frames) <= 15  # 0.6-1.2 s at 12 fps
        codec, rate, channels, samples = _audio(video)
        assert (codec, rate, channels) == ("aac", 48000, 2)
        assert abs(samples - len(frames) / 12 * 48000) <= 2 * 1024 + 48000 / 12
    with (root / "train_sent_emo.csv").open(encoding="utf-8", newline="") as f:
        kept = list(csv.DictReader(f))
    with (meld_csv_dir / "train_sent_emo.csv").open(encoding="utf-8", newline="") as f:
        real = list(csv.DictReader(f))[:2]
    assert kept == real


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_fixture(manifest_path):
    corpus = read_manifest(manifest_path)
    assert corpus.name == "manifest" and corpus.label_names == ["angry", "happy", "neutral", "sad"]
    assert [(d.dialogue_id, d.split, len(d)) for d in corpus.dialogues] == [
        ("chat", "train", 4), ("call", "train", 3), ("visit", "dev", 4), ("trip", "test", 3)]
    chat, call, visit, trip = corpus.dialogues
    media = manifest_path.parent / "media"
    assert chat.utterances[0].video == chat.utterances[0].audio == media / "chat_0.mp4"
    assert [u.speaker_index for u in chat.utterances] == [0, 1, 0, 1]
    assert all(u.video == media / "call.mp4" and u.audio == media / "call.wav" for u in call.utterances)
    assert [(u.start, u.end) for u in call.utterances] == [(u.audio_start, u.audio_end) for u in call.utterances]
    assert all(u.end - u.start == pytest.approx(1.0) for u in call.utterances)
    assert [(u.video is not None, u.audio is not None) for u in visit.utterances] == [
        (True, True), (True, True), (False, True), (False, False)]
    assert visit.utterances[0].audio == media / "visit_0.wav"
    assert [u.utterance_id for u in trip.utterances] == ["trip_10", "trip_12", "trip_14"]
    assert [u.index for u in trip.utterances] == [0, 1, 2]
    assert trip.utterances[2].text.endswith("café!")
    for u in (u for d in corpus.dialogues for u in d.utterances):
        assert all(p is None or p.is_file() for p in (u.video, u.audio))


HEADER = "dialogue_id,utterance_index,speaker,text,label,split,video,start,end\n"
GOOD = "a,0,Ann,Hi.,neutral,train,clip.mp4,,\na,1,Ben,Hey!,happy,train,,,\n"


@pytest.mark.parametrize(
    "content, message",
    [
        ("dialogue_id,utterance_index,speaker,text,split\na,0,Ann,Hi.,train\n", r"missing required column\(s\) label"),
        (HEADER + GOOD + "a,1,Cat,Again.,sad,train,,,\n", r"line 4: duplicate utterance_index 1 in dialogue 'a'"),
        (HEADER + GOOD + "a,two,Cat,Oops.,sad,train,,,\n", r"line 4: utterance_index 'two' is not an integer"),
        (HEADER + GOOD + "b,0,Cat,Hm.,sad,validation,,,\n", r"line 4: split 'validation' is not one of"),
        (HEADER + GOOD + "b,0,Cat,Hm.,sad,dev,v.mp4,2.5,1.0\n", r"line 4: end 1.0 is not after start 2.5"),
        (HEADER + GOOD + "b,0,Cat,Hm.,sad,dev,v.mp4,soon,\n", r"line 4: start 'soon' is not a number"),
        (HEADER + GOOD + "a,2,Cat,Hm.,sad,test,,,\n", r"line 4: dialogue 'a' is in split test here but train on line"),
        (HEADER + GOOD + "b,0,Cat,Hm.,,dev,,,\n", r"line 4: empty label"),
        (HEADER + GOOD + 'b,0,,"Hm, yes.",sad,dev,,,\n', r"line 4: empty dialogue_id or speaker"),
        (HEADER, r"manifest has no rows"),
    ],
)
def test_manifest_errors_name_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"bad\.csv: .*{message}"):
        read_manifest(path)


def test_manifest_unlabeled_and_dispatch(tmp_path, iemocap_root):
    (tmp_path / "manifest.csv").write_text(HEADER + GOOD, encoding="utf-8")
    by_folder = load_corpus("manifest", tmp_path)
    by_file = load_corpus("manifest", tmp_path / "manifest.csv")
    assert by_folder.label_names == by_file.label_names == ["happy", "neutral"]
    assert by_folder.dialogues[0].utterances[0].video == tmp_path / "clip.mp4"
    plain = tmp_path / "plain.csv"
    plain.write_text("dialogue_id,utterance_index,speaker,text\nx,0,Ann,Hello.\nx,1,Ann,Still me.\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"plain\.csv: missing required column\(s\) label, split"):
        load_corpus("manifest", tmp_path, manifest=plain)
    unlabeled = load_corpus("manifest", tmp_path, manifest=plain, allow_unlabeled=True)
    assert unlabeled.label_names == []
    assert [(u.label, u.split, u.speaker_index) for u in unlabeled.dialogues[0].utterances] == [
        (None, "test", 0), (None, "test", 0)]
    assert load_corpus("iemocap", iemocap_root, label_set="4class").label_names == ["happy", "sad", "neutral", "angry"]
    with pytest.raises(ConfigError, match="unknown dataset 'ravdess'"):
        load_corpus("ravdess", tmp_path)


def test_limit_dialogues_takes_the_first_of_each_split(manifest_path):
    corpus = read_manifest(manifest_path)
    limited = limit_dialogues(corpus, 1)
    assert [d.dialogue_id for d in limited.dialogues] == ["chat", "visit", "trip"]
    assert limited.label_names == corpus.label_names
    with pytest.raises(ConfigError):
        limit_dialogues(corpus, 0)


# ----------------------------------------------------------------------------------- synthetic media


def test_face_video_decodes_with_opencv_and_pyav(tmp_path):
    stereo = np.stack([voiced_signal(1.0, 48000, 200.0)] * 2, axis=1)
    mp4 = write_face_video(tmp_path / "clip.mp4", 1.0, fps=12, size=(320, 180), audio=stereo, audio_rate=48000)
    avi = write_face_video(tmp_path / "talk.avi", 1.5, fps=10, size=(320, 180), audio=voiced_signal(1.5, 16000),
                           audio_rate=16000, faces=2)
    frames = _frames(mp4)
    assert len(frames) == 12 and frames[0].shape == (180, 320, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 5  # the face moves
    codec, rate, channels, samples = _audio(mp4)
    assert (codec, rate, channels) == ("aac", 48000, 2) and abs(samples - 48000) <= 2048
    assert len(_frames(avi)) == 15
    assert _audio(avi) == ("pcm_s16le", 16000, 1, 24000)
    silent = write_face_video(tmp_path / "silent.mp4", 0.5, fps=12, size=(320, 180))
    with av.open(str(silent)) as container:
        assert not container.streams.audio and container.streams.video[0].frames in (0, 6)
    with pytest.raises(ValueError, match="even"):
        write_face_video(tmp_path / "odd.mp4", 0.5, size=(321, 180))


def test_synthetic_faces_are_detected(iemocap_root, tmp_path):
    from facenet_pytorch import MTCNN

    detector = MTCNN(keep_all=True, device="cpu")
    assert face_image().shape == (160, 160, 3)
    dialogue = _frames(iemocap_root / "Session1/dialog/avi/DivX/Ses01F_impro01.avi")
    pair = _frames(write_face_video(tmp_path / "two.mp4", 1.0, fps=12, size=(320, 180), seed=3, faces=2))
    for frame, faces in ((dialogue[len(dialogue) // 2], 1), (pair[6], 2)):
        boxes, probs = detector.detect(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        assert boxes is not None and len(boxes) == faces and (probs > 0.95).all()
        assert ((boxes[:, 2] - boxes[:, 0]) >= 60).all()


def test_iemocap_tree_media_match_the_labels(iemocap_root):
    corpus = read_iemocap(iemocap_root)
    dialogue = corpus.split("test")[0]
    video = dialogue.utterances[0].video
    frames = _frames(video)
    assert len(frames) / 12 > dialogue.utterances[-1].end
    assert _audio(video)[:3] == ("pcm_s16le", 16000, 1)
    for u in dialogue.utterances:
        with wave.open(str(u.audio)) as f:
            assert (f.getframerate(), f.getnchannels()) == (16000, 1)
            assert f.getnframes() == round((u.end - u.start) * 16000)


def test_voice_follows_emotion_in_opensmile_features():
    import opensmile

    smile = opensmile.Smile(opensmile.FeatureSet.eGeMAPSv02, opensmile.FeatureLevel.Functionals)
    pitch, loudness = {}, {}
    for label in ("sad", "neutral", "angry"):
        f0, amplitude = emotion_voice(label)
        features = smile.process_signal(voiced_signal(1.5, 16000, f0, seed=1, amplitude=amplitude), 16000)
        pitch[label] = 27.5 * 2 ** (float(features["F0semitoneFrom27.5Hz_sma3nz_amean"].iloc[0]) / 12)
        loudness[label] = float(features["loudness_sma3_amean"].iloc[0])
        assert pitch[label] == pytest.approx(f0, rel=0.1), label
    assert loudness["sad"] < loudness["neutral"] < loudness["angry"]


def test_demo_corpus(tmp_path):
    manifest = make_demo_corpus(tmp_path / "demo")
    corpus = read_manifest(manifest)
    assert corpus.label_names == ["angry", "happy", "neutral", "sad"]
    assert [len(corpus.split(s)) for s in SPLITS] == [10, 3, 3] and corpus.num_utterances == 96
    assert len({u.text for d in corpus.dialogues for u in d.utterances}) == 96  # no line is used twice
    for split in SPLITS:
        assert {u.label for d in corpus.split(split) for u in d.utterances} == set(corpus.label_names)
    clip = corpus.dialogues[0].utterances[1].video
    assert clip.is_file() and len(_frames(clip)) <= 24
    assert _audio(clip)[:3] == ("aac", 16000, 1)
    assert sum(p.stat().st_size for p in (tmp_path / "demo/media").iterdir()) < 96 * 100_000  # under 100 kB a clip


def test_manifest_not_utf8_names_the_line_in_one_clear_error(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes((HEADER + GOOD).encode() + "b,0,Cat,Voilà déjà vu.,sad,dev,,,\n".encode("cp1252"))
    with pytest.raises(CorpusError) as caught:
        read_manifest(path)
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and caught.value.__cause__ is None and caught.value.__suppress_context__
    assert re.fullmatch(r".*latin\.csv: line 4: byte 0xe0 at column 13 is not UTF-8; save the manifest as UTF-8.*", message)
    assert "\n" not in message
    # a BOM is fine, and so is UTF-8 text
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (HEADER + GOOD + "b,0,Cat,Voilà.,sad,train,,,\n").encode())
    assert read_manifest(bom).dialogues[1].utterances[0].text == "Voilà."


def test_manifest_labels_differing_only_in_case_and_the_labels_option(tmp_path):
    path = tmp_path / "case.csv"
    path.write_text(HEADER + "a,0,Ann,Yay.,Joy,train,,,\na,1,Ben,Hm.,sad,train,,,\na,2,Ann,Yes!,joy,train,,,\n"
                    "b,0,Cat,Oh.,JOY,test,,,\nb,1,Dan,No.,angry,test,,,\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"case\.csv: labels differing only in case .*'Joy' \(line 2\) and 'joy' "
                                          r"\(line 4\) and 'JOY' \(line 5\).*--labels"):
        read_manifest(path)
    with pytest.warns(ErcWarning, match=r"class\(es\) with no training example.*'angry': lines 6.*'fear': no row"):
        corpus = load_corpus("manifest", tmp_path, manifest=path, labels=["sad", "joy", "angry", "fear"])
    assert corpus.label_names == ["sad", "joy", "angry", "fear"]  # the given order, not sorted
    assert [u.label for d in corpus.dialogues for u in d.utterances] == ["joy", "sad", "joy", "joy", "angry"]
    with pytest.raises(CorpusError, match=r"case\.csv: line 6: label 'angry' is not one of --labels sad,joy"):
        read_manifest(path, labels=["sad", "joy"])
    with pytest.raises(ConfigError, match="the same class twice"):
        read_manifest(path, labels=["joy", "JOY"])
    with pytest.raises(ConfigError, match="--labels applies to manifest corpora"):
        load_corpus("meld", tmp_path, labels=["joy"])
