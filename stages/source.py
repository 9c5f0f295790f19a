"""source: what the base model is made from -> models/source.json, so that `base` reruns when it changes.

DVC hashes the files a stage names, and `model.source` may name a local directory outside the project, which no
dvc.yaml entry can list for every choice of source. This stage runs on every `dvc repro` (`always_changed`) and
writes what the source is now: `scratch`; a hub id and the revision pinned; or a local directory and the sha256 of
every file in it (weights, config, tokenizer, generation config; seconds for a model of several GB). `base`
depends on the file: replacing the weights of a local source reruns `base` and what follows, and an unchanged
source leaves the file's bytes, and so every later stage, as they were.
"""

import json
from pathlib import Path

from latentlab.common.atomic import atomic_output
from stages.common import stage
from stages.paths import SOURCE

OUT = SOURCE


def describe_source(source: str, revision: str | None) -> dict:
    """What `base` is made from, as it is now (see the module doc); a path is compared by content, not by name."""
    if source == "scratch":
        return {"source": "scratch"}
    directory = Path(source).expanduser()
    if not directory.is_dir():  # a hub id: the revision pins it (latest when null)
        return {"source": source, "revision": revision}
    from latentlab.lm.modeling import content_hash

    files = sorted(
        file
        for file in directory.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(directory).parts)
    )
    return {"source": "local directory", "files": len(files), "sha256": content_hash(directory, files)}


@stage
def main(params):
    described = describe_source(params.model.source, params.model.revision)
    with atomic_output(OUT) as partial:
        partial.write_text(json.dumps(described, indent=2) + "\n")
    print(f"{OUT}: {described}")


if __name__ == "__main__":
    main()
