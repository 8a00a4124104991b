"""OphGLM: an ophthalmic language-and-vision assistant that runs offline on a CPU."""

__version__ = "0.1.0"

DISCLAIMER = (
    "OphGLM is a research assistant, not a medical device: this is not a diagnosis. "
    "Have any concern about your eyes checked by an eye-care professional."
)

# Failures a user can cause (bad file, bad setting, unknown id): reported in one line, never a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError)
