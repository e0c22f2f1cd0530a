"""The project's exception types: each names what was wrong and where."""


class MistralError(Exception):
    """Base class for every error this package raises on bad input."""


class CheckpointError(MistralError):
    """A weights folder or file that cannot be loaded: the message names the file and the tensor."""


class TokenizerError(MistralError):
    """A tokenizer file that is missing or is not a v3 SentencePiece model."""


class RequestError(MistralError, ValueError):
    """A bad chat request or generation parameter.

    `param` names the offending field the way OpenAI's error bodies do (`messages[2].content`,
    `temperature`), so an HTTP layer can answer 400 with it unchanged.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
