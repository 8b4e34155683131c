"""Exceptions raised by the library; the CLI turns them into one-line messages and exit codes."""


class ErcError(Exception):
    """Base class of every error erc raises on purpose."""


class CorpusError(ErcError):
    """A corpus on disk is malformed (bad CSV, unreadable transcript, unknown label)."""


class MediaError(ErcError):
    """A media file is missing, corrupt, or lacks the stream asked for (no audio track, no frames)."""


class SilentAudioError(MediaError):
    """The audio of an utterance carries no signal."""


class NoFaceError(MediaError):
    """MTCNN found no face in any sampled frame of an utterance."""


class ShardError(ErcError):
    """A shard file is missing, truncated, or does not match the shard set it belongs to."""


class ConfigError(ErcError):
    """Options that cannot work together, or weights that do not match what a run recorded."""


class CorpusEncodingError(CorpusError, ConfigError):
    """A corpus text file (a manifest) is not valid UTF-8."""


class IncompleteShardSetError(ShardError):
    """A shard set lacks planned shards (its extraction stopped early) and partial use was not allowed."""


class ExtractionError(ErcError):
    """``--strict`` extraction met an unexpected exception, or a shard could not be extracted at all."""


class ErcWarning(UserWarning):
    """Something a user should know that does not stop the run (e.g. a class without training examples)."""
