"""The project's exception hierarchy: one base class, one subclass per kind of bad input."""


class FedPGPError(Exception):
    """Base class of every error fedpgp raises on purpose (the CLI turns it into one line)."""


class ConfigError(FedPGPError):
    """A configuration key is unknown, has the wrong type or is out of range."""


class DatasetError(FedPGPError):
    """A dataset folder, split file, image or partition manifest is missing or malformed."""


class CheckpointError(FedPGPError):
    """A checkpoint is missing, truncated, corrupted or belongs to another run."""


class BackboneError(FedPGPError):
    """CLIP weights cannot be found, downloaded or recognised."""


class WriteError(FedPGPError):
    """A file cannot be written: a full disk, a read-only folder, a folder where a file goes."""
