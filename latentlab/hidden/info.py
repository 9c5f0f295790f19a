"""What a hidden-state store holds, finished or not (the `latentlab info` report), and the names
users of TransformerLens know for its layers.

Layers are numbered as `output_hidden_states` (latentlab/lm/capture.py): index 0 is the embeddings,
i < n the input of block i, n (= -1) the final norm's output. The same points in TransformerLens:

    output_hidden_states[i], 0 <= i < n     blocks.{i}.hook_resid_pre   (i = 0: the embeddings)
    output_hidden_states[n] (layer -1)      ln_final.hook_normalized

(blocks.{i}.hook_resid_pre is also blocks.{i-1}.hook_resid_post.) The values agree with TransformerLens
loaded without weight processing (`HookedTransformer.from_pretrained_no_processing`), with one
caveat: TransformerLens places `hook_normalized` before the norm's elementwise weight (and bias),
and Hugging Face's last hidden state is after it, so the stored -1 is `hook_normalized * ln_final.w
(+ ln_final.b)`. Its default `from_pretrained` folds that weight into the unembedding, and for
LayerNorm models centres the residual stream, which changes both kinds of values.
"""

from pathlib import Path

from latentlab.hidden.attrs import StoreAttrs
from latentlab.hidden.store import filesystem, open_any_store, store_location


def hook_name(index: int, num_blocks: int) -> str:
    """The TransformerLens hook at `output_hidden_states[index]` (index resolved into 0..num_blocks)."""
    if not 0 <= index <= num_blocks:
        raise IndexError(f"hidden state {index} is out of range 0..{num_blocks}")
    return f"blocks.{index}.hook_resid_pre" if index < num_blocks else "ln_final.hook_normalized"


def hook_names(attrs: StoreAttrs) -> list[str | None]:
    """The TransformerLens hook name of each stored layer (see latentlab.lm.capture.hook_name). A
    store written before they were recorded gets them when a layer was asked for by a negative
    index (that fixes the number of blocks), else None."""
    if attrs.hook_names is not None:
        return list(attrs.hook_names)
    indices, layers = attrs.layer_indices or [], attrs.layers
    blocks = attrs.num_blocks
    if blocks is None:  # -1 sits at index num_blocks, -k at num_blocks + 1 - k
        blocks = next((index - layer - 1 for layer, index in zip(layers, indices) if layer < 0), None)
    if blocks is None or not indices:
        return [None] * len(layers)
    return [hook_name(i, blocks) for i in indices]


def describe_store(path: str | Path) -> dict:
    """What a store holds, finished or not: model, layers with their hook names, mode, rows, arrays,
    bytes on disk, whether it is complete (the `latentlab info` report)."""
    path = store_location(path)
    fs, root = filesystem(path)
    group = open_any_store(path)
    attrs = StoreAttrs.read(group.attrs, str(path))
    try:
        arrays = {
            name: {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "chunks": list(array.chunks),
                "shards": list(array.shards) if array.shards else None,
            }
            for name, array in sorted(group.arrays())
        }
    except Exception as error:  # an array's own metadata damaged
        raise ValueError(f"{path} is not a readable Zarr store: {error}") from None
    files = fs.find(root, detail=True)  # {path: info}, files only
    indices = attrs.layer_indices or [None] * len(attrs.layers)
    return {
        "path": str(path),
        "format": attrs.format,
        "complete": attrs.complete,
        "model": attrs.model.model_dump(exclude_none=True),
        "layers": [
            {"layer": layer, "index": index, "hook_name": hook}
            for layer, index, hook in zip(attrs.layers, indices, hook_names(attrs))
        ],
        "mode": attrs.mode,
        "tokens": attrs.tokens,
        "pooling": attrs.pooling,
        "positions": attrs.positions,
        "rows": attrs.rows,
        "hidden_size": attrs.hidden_size,
        "dtype": attrs.dtype,
        "arrays": arrays,
        "bytes": sum(info["size"] for info in files.values()),
        "files": len(files),
        "normalization": sorted(attrs.normalization or {}),
    }
