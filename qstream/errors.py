"""One exception family: every error a user can cause is a QstreamError with a
one-line, actionable message. The CLI prints it and exits 2; library users
catch QstreamError."""


class QstreamError(Exception):
    """Base class of qstream's user-facing errors."""


class RecipeError(QstreamError):
    """A recipe file is missing, malformed or asks for something unsupported."""


class SourceError(QstreamError):
    """The model source named by a recipe cannot be found or read."""


class ShardError(QstreamError):
    """A shard directory is missing, incomplete, corrupt or belongs to another model."""


class BudgetError(QstreamError):
    """A memory budget is too small or malformed."""


class EvalError(QstreamError):
    """Bad input to an evaluation (dataset, text, task, context length)."""


class DraftCacheFull(QstreamError):
    """The draft's static KV cache has no room for the next forward (speculation then decodes plainly)."""
