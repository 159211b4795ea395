"""nextword: streaming next-word prediction with recurrent language models.

This package holds what every side must agree on: the tokenizer, the bundle
schema, the generated API stubs (``nextword.v1``) and the command line.
"""

__version__ = "0.1.0"
