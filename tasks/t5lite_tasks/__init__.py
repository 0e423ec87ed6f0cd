"""SeqIO task and mixture registrations bundled with t5lite (`import t5lite_tasks`).

Importing this package registers:

* over the bundled demo corpus (Python's documentation as plain text, 7.7 M characters, with
  an 8k SentencePiece vocabulary): `demo_span_corruption`, `demo_prefix_lm`, `demo_ul2`,
  `demo_ul2r`, `demo_bart`, and the supervised `demo_copy` (with an exact-match metric);
* over TFDS `c4/en:3.1.0`: `c4_span_corruption`, `c4_ul2` (vocabulary: T5's public 32k model,
  or the file named by the environment variable T5LITE_C4_VOCABULARY).

The core library never imports this package; commands import it by default (`--module_import`).
"""

from t5lite_tasks import c4, demo  # noqa: F401  (registration side effects)
