"""Exceptions users see: four families, one class per failed check.

Every error raised on bad input is a ``FedarchesError`` whose message names the
problem and what to do about it; the CLI prints it on one line and exits 2.
Keeping one hierarchy lets callers (CLI, Flower client, server intake) tell
"the user's input is wrong" apart from "the program is broken".

Why one class per check (as python-tuf's ``api/exceptions.py`` does): a caller
that must react to *which* check failed (a test, the Flower coordinator's
report, an operator's script) should not parse message text. Each class names
its check in ``check``, and the message starts with it. The four families stay
the public catch-alls:

- ``InputDataError``: the user's data, options or configuration cannot be used;
- ``ModelFileError``: a model directory, atlas directory or published
  repository on this machine is missing, damaged or not what it claims;
- ``VerificationError``: a signature, hash, version, expiry or trust check on
  something that came from elsewhere failed; nothing was loaded;
- ``ContributionError``: a site contribution bundle cannot be accepted.
"""

from __future__ import annotations


class FedarchesError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    #: The check that failed, as the message names it ("signature check", ...).
    check: str = ""


# ----------------------------------------------------------------- input data


class InputDataError(FedarchesError, ValueError):
    """The AnnData (or its columns), an option or a configuration cannot be used as given."""


class DataFileError(InputDataError):
    check = "data file check"


class EmptyDataError(InputDataError):
    check = "data shape check"


class GeneNameError(InputDataError):
    """Missing, empty or duplicated gene names."""

    check = "gene name check"


class GeneOverlapError(InputDataError):
    check = "gene overlap check"


class CountValueError(InputDataError):
    """NaN, infinite, negative or (for count models) non-integer values."""

    check = "count value check"


class ColumnError(InputDataError):
    """An obs column (condition or label key) is missing or unusable."""

    check = "obs column check"


class SettingError(InputDataError):
    """An option, run-config or node-config value is out of range or unknown."""

    check = "setting check"


class InvalidNameError(InputDataError):
    """A condition, site or atlas name breaks the name rules."""

    check = "name check"


class NothingToMapError(InputDataError):
    """Every condition of the query is already in the model (surgery has nothing to add)."""

    check = "new condition check"


class UnknownConditionError(InputDataError):
    """Embedding cells of conditions the model does not hold."""

    check = "known condition check"


class LatentError(InputDataError):
    """A latent matrix (cells x dims) is not numeric, not 2-D, not finite or has the wrong dimensions."""

    check = "latent check"


class LabelStateError(InputDataError):
    """A label-transfer state is missing, incomplete or belongs to another reference."""

    check = "label transfer state check"


class LabelShareError(InputDataError):
    """``--share-labels`` cannot be honoured: the version holds no label summaries, or no label
    of the site has ``k_min`` cells."""

    check = "label share check"


class OutputPathError(InputDataError):
    """An output path exists and is not something this command may replace."""

    check = "output path check"


# ---------------------------------------------------------------- model files


class ModelFileError(FedarchesError):
    """A model directory, atlas directory or repository is missing, corrupt, foreign or fails a hash check."""


class ModelDirError(ModelFileError):
    """Not a model directory, or an incomplete one."""

    check = "model directory check"


class ManifestError(ModelFileError):
    """A manifest on disk (model or fetched version) is not valid."""

    check = "manifest check"


class BlobHashError(ModelFileError):
    """A file on disk does not match the sha256 its manifest records."""

    check = "blob hash check"


class ArchitectureError(ModelFileError):
    """Tensors do not fit the architecture the manifest describes."""

    check = "architecture check"


class AtlasDirError(ModelFileError):
    """Not an atlas directory, or an operation this atlas directory cannot take."""

    check = "atlas directory check"


class ReferenceExistsError(AtlasDirError):
    check = "reference check"


class RepositoryError(ModelFileError):
    """The coordinator's own published repository is incomplete or corrupt."""

    check = "atlas repository check"


class AtlasKeyError(ModelFileError):
    check = "atlas key check"


class TrustCacheError(ModelFileError):
    """The site's trusted-metadata cache folder cannot be read or written (its own disk)."""

    check = "trust cache check"


class OlderVersionError(ModelFileError):
    """A fetch would replace a model folder holding a newer version of the same atlas."""

    check = "version order check"


# ---------------------------------------------------------------- verification


class VerificationError(FedarchesError):
    """A signature, hash, version or trust check failed; nothing was loaded."""


class SignatureError(VerificationError):
    check = "signature check"


class HashError(VerificationError):
    check = "hash check"


class LengthError(VerificationError):
    """More data than the signed length allows (endless data)."""

    check = "length check"


class ExpiryError(VerificationError):
    check = "expiry check"


class RollbackError(VerificationError):
    check = "rollback check"


class DownloadError(VerificationError):
    check = "download check"


class MetadataError(VerificationError):
    """TUF metadata is invalid in a way none of the more specific checks names."""

    check = "metadata check"


class TrustRootError(VerificationError):
    check = "trust root check"


class EnrollmentError(VerificationError):
    check = "enrollment check"


class KeyFileError(VerificationError):
    check = "key file check"


class CanonicalJSONError(VerificationError):
    check = "canonical JSON check"


class VersionManifestError(VerificationError):
    """A published version manifest is not canonical, not consistent or hashes to the wrong id."""

    check = "version manifest check"


class LineageError(VerificationError):
    check = "lineage check"


class UnknownVersionError(VerificationError):
    """The version asked for was never published (by number, id or branch)."""

    check = "version check"


class ProtocolError(VerificationError):
    """A Flower message does not speak this package's protocol."""

    check = "protocol check"


class TargetError(VerificationError):
    """The atlas does not publish a file it must."""

    check = "target check"


# ---------------------------------------------------------------- contributions


class ContributionError(FedarchesError):
    """A site contribution bundle cannot be accepted (shape, collision, parent...)."""


class BundleFileError(ContributionError):
    check = "bundle file check"


class BundleSizeError(ContributionError):
    check = "bundle size check"


class BundleFormatError(ContributionError):
    check = "bundle format check"


class BundleManifestError(ContributionError):
    check = "bundle manifest check"


class BundleContentError(ContributionError):
    """Tensors, keys or metadata do not match what the signed manifest says."""

    check = "bundle content check"


class BundleMetricsError(ContributionError):
    check = "bundle metrics check"


class TensorShapeError(ContributionError):
    check = "tensor shape check"


class TensorValueError(ContributionError):
    check = "tensor value check"


class AtlasMismatchError(ContributionError):
    check = "atlas check"


class ParentError(ContributionError):
    check = "parent check"


class ConditionCollisionError(ContributionError):
    check = "condition collision"


class LabelPartError(ContributionError):
    """A bundle's shared label summaries are malformed: fields, shapes, values, k_min, dimensions."""

    check = "label part check"


class FrozenWeightsError(ContributionError):
    """A ``conditions`` mapping changed a tensor it must leave byte-identical."""

    check = "frozen weights check"


class ContributionContentError(ContributionError):
    """The site's mapped model does not extend the atlas version it claims to."""

    check = "contribution check"


class DeadlineError(ContributionError):
    """A site's job ran past the round's deadline and was stopped; nothing was sent."""

    check = "deadline check"


def check_classes() -> list[type[FedarchesError]]:
    """Every per-check class (those with a ``check`` name), for tests and docs."""
    out: list[type[FedarchesError]] = []
    todo: list[type[FedarchesError]] = [FedarchesError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.check:
            out.append(cls)
    return sorted(out, key=lambda c: c.__name__)
