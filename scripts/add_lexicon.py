"""Give an existing bundle its lexicon: the words of its training text outside its vocabulary.

    python scripts/add_lexicon.py models/demo

``nextword export`` writes the lexicon itself; this is for bundles exported before it did. The
training text is the one the manifest names (``training.data.train``), read from where it was
then (paths are relative to the directory training ran in: run this from there) and checked
against its recorded sha256. The manifest is rewritten with the new file's checksum.
"""

from __future__ import annotations

import sys

from nextword.bundle import BundleError, build_lexicon, load_bundle, write_manifest


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(argv[0])
    except BundleError as exc:
        print(f"add_lexicon: {exc}", file=sys.stderr)
        return 2
    lexicon = build_lexicon(bundle.path, bundle.manifest, bundle.vocab)
    if lexicon is None:
        train = bundle.manifest.training.get("data", {}).get("train", {})
        print(
            f"add_lexicon: the training text {train.get('path')!r} is not here or has changed",
            file=sys.stderr,
        )
        return 1
    write_manifest(bundle.path, bundle.manifest)
    print(f"{bundle.path}: lexicon of {len(lexicon):,} words outside the vocabulary ({lexicon.total:,} uses)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
