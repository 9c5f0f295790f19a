"""Labelling a dataset into a Zarr v3 store of hidden states, resumably and across torchrun ranks.

Store (one per dataset): `pooled (N, L, H)` float32, optional `tokens (N, T, L, H)` float16 (zeros
where a position was not pooled), `ids (N,)`, `n_positions (N,)` (positions in each mean), and
attributes (`StoreAttrs`): model (path, source, sha256), layers, mode, tokens, pooling, positions, dtype, ...
Chunks of `batch_size` rows sit inside shard files of `shard_rows` rows: a store is a few files.

Resume and atomicity: a run writes into a work directory outside the DVC outputs (DVC deletes
outputs before it runs a stage), one whole shard at a time, each shard followed by a done-marker
file. A rerun of the same job (same fingerprint: config, seed, model hash, rows) skips the marked
shards; sampling is seeded per batch, so a shard's content does not depend on which shards ran
before it and the final store is identical to an uninterrupted run. Only when every shard is
marked is the store flagged `complete: true` and renamed onto its final path; readers
(`open_store`) refuse a store that is not complete. Under torchrun, rank r takes shards
r, r + world, ...: disjoint files, no locking, and the same store as one process.

On object storage (a store at an fsspec URL, `s3://bucket/x.zarr`) nothing can be renamed: the
store is written in place, and "nothing half-written" means no store that claims to be complete
is ever partial: its `complete` attribute is set last (one PUT of zarr.json replaces the object
whole), and readers refuse it until then. The work (the done-markers, the shards' rows and a
`started` marker written once the empty store exists) lives beside it on the same storage
(`s3://bucket/.x.zarr.work/`), so a rerun on any machine, or ranks on several nodes, share it.
A rerun of another job over a finished store replaces it: the old store is gone from the start.
"""

import hashlib
import json
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import torch
import zarr
from pydantic import Field, model_validator

from latentlab.common.atomic import atomic_output
from latentlab.common.distributed import Ranks
from latentlab.common.heap import freeze_heap, keep_freed_memory
from latentlab.common.tracking import progress
from latentlab.hidden.attrs import ModelInfo, StoreAttrs
from latentlab.hidden.extract import ExtractConfig, Extracted, Extractor, TokenRows
from latentlab.hidden.info import hook_name
from latentlab.hidden.store import FORMAT, Compression, filesystem, is_url, store_arrays, store_metadata, write_store
from latentlab.lm.capture import decoder_blocks
from latentlab.lm.modeling import describe_model, load_lm
from latentlab.lm.prompt_format import RAW, PromptFormat


class LabelConfig(ExtractConfig):
    store_tokens: bool = False
    """Also store the states of every pooled position: tokens (N, T, L, H) float16."""
    batch_size: int = Field(256, gt=0)
    """Rows per forward pass; also the Zarr chunk along N and the unit that seeds sampling."""
    shard_rows: int = Field(1024, gt=0)
    """Rows per shard file: the unit written, resumed and handed to a rank (a multiple of batch_size); also
    the span within which rows are grouped into batches by length."""
    compression: Compression = "zstd"
    """Codec of the float arrays (pooled, tokens): none, lz4 (byte-shuffled, Blosc) or zstd (level 1). Hidden
    states are nearly incompressible; zstd shrinks the zeros after end-of-sequence in `tokens` (see
    benchmarks/label.py for each codec's write time and bytes). Readers open stores of any codec."""

    @model_validator(mode="after")
    def _shards_hold_whole_batches(self):
        if self.shard_rows % self.batch_size:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of batch_size ({self.batch_size})")
        return self


@dataclass
class Job:
    """A dataset checked and ready to label, and the identity (`fingerprint`) of its result."""

    name: str
    rows: pl.DataFrame  # at least `id` and `prompt`
    cfg: LabelConfig
    seed: int
    model: dict  # describe_model(...)
    prompts: TokenRows  # tokenized once
    width: int  # T of the tokens array
    completions: TokenRows | None  # re-extraction: the given completions' token ids
    fingerprint: str

    @property
    def shards(self) -> int:
        return -(-self.rows.height // self.cfg.shard_rows)

    def shard_span(self, shard: int) -> tuple[int, int]:
        return shard * self.cfg.shard_rows, min(self.rows.height, (shard + 1) * self.cfg.shard_rows)

    def attributes(self, extractor: Extractor) -> StoreAttrs:
        """The store's attributes, flagged incomplete (nothing written yet)."""
        blocks = len(decoder_blocks(extractor.model)[0])
        return StoreAttrs.of_extraction(
            self.cfg,
            extractor.prompt_format,
            text=self.completions is not None,
            fingerprint=self.fingerprint,
            model=ModelInfo(**self.model),
            layer_indices=extractor.layer_indices,
            # the same points as TransformerLens hooks, for users who know those names
            hook_names=[hook_name(i, blocks) for i in extractor.layer_indices],
            num_blocks=blocks,
            hidden_size=extractor.hidden_size,
            rows=self.rows.height,
            seed=self.seed,
        )


def prepare(
    extractor: Extractor,
    name: str,
    rows: pl.DataFrame,
    cfg: LabelConfig,
    seed: int,
    model: dict,
    completions: TokenRows | None = None,
    source: str | None = None,
) -> Job:
    """Tokenize once and check every row (empty data, context length) before any work. With
    `completions` (token ids per row): re-extract them in one teacher-forced pass, not generate.
    Messages name `source` (the input file), or else `name`."""
    prompts, ids = extractor.encode_prompts(rows["prompt"].to_list()), rows["id"].to_numpy()
    try:
        width = extractor.check(prompts, ids, completions)
    except ValueError as error:
        raise ValueError(f"{source or name}: {error}") from None
    # what the result depends on; not the world size: any number of ranks resumes any other's work
    identity = [FORMAT, _identity(cfg), seed, model, name, BATCHING]
    if extractor.prompt_format != RAW:  # raw: the fingerprint of stores written before prompt formats
        identity.append(extractor.prompt_format.model_dump())
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for tokens in (prompts, completions) if completions is not None else (prompts,):
        digest.update(tokens.flat.tobytes() + tokens.offsets.tobytes())
    digest.update(ids.tobytes())
    return Job(name, rows, cfg, seed, model, prompts, width, completions, digest.hexdigest())


# which rows share a batch (`_extract_shard`) is part of a job: each batch samples from its own stream, so
# work batched another way (in row order, before rows were grouped by length) is not resumed into this job
BATCHING = "grouped by prompt length within a shard"

# options added after the store format's first version: at their defaults they leave a job's
# fingerprint (and a store's attributes) as before, so earlier stores and unfinished work keep theirs
LATER_OPTIONS = ("stop_at_eos", "compression", "pooling")


def _identity(cfg: LabelConfig) -> dict:
    """The config as it enters a job's fingerprint: every option, the later ones only when not at their default."""
    defaults = {name: LabelConfig.model_fields[name].default for name in LATER_OPTIONS}
    return cfg.model_dump(exclude={name for name, value in defaults.items() if getattr(cfg, name) == value})


@dataclass
class LabelSet:
    """One dataset to label, and where its results go."""

    name: str  # the job's name: it seeds the sampling streams (same name, rows and config: same store)
    rows: pl.DataFrame  # at least `id` (int64) and `prompt` (string)
    store: Path | str  # the Zarr store: a path or an fsspec URL (s3://bucket/x.zarr)
    table: Path | str | None  # the rows plus what was generated (Parquet), beside the store
    work: Path | str  # work in progress, what a rerun resumes from (outside any DVC output; a URL for a URL store)
    source: str | None = None  # the input file, named in messages (default: `name`)


def label_sets(
    model_path: str | Path,
    sets: Sequence[LabelSet],
    cfg: LabelConfig,
    seed: int,
    device,
    ranks: Ranks | None = None,
    prompt_format: PromptFormat = RAW,
) -> None:
    """THE label run, shared by the `label` stage and `latentlab label`: load the model (a directory
    or a hub id) once, check every set (empty, too long for the context) before any is labelled, then
    label each one resumably, its shards split across torchrun ranks. Prompts are encoded in `prompt_format`."""
    model, tokenizer = load_lm(model_path, device, dtype=getattr(torch, cfg.dtype))
    extractor = Extractor(model, tokenizer, cfg, prompt_format)
    info = _describe(model_path)
    freeze_heap()  # before tokenizing every set, which makes objects too
    jobs = [prepare(extractor, s.name, s.rows, cfg, seed, info, source=s.source) for s in sets]
    for job, target in zip(jobs, sets):
        label(extractor, job, target.store, target.table, target.work, ranks)


def _describe(path_or_id: str | Path) -> dict:
    """`describe_model` of a directory, or of a hub id `load_lm` has loaded (its files are then in
    the local Hugging Face cache: the hash is over those; path and source are the id)."""
    if Path(path_or_id).exists():
        return describe_model(path_or_id)
    from huggingface_hub import snapshot_download

    local = snapshot_download(str(path_or_id), local_files_only=True)
    return {**describe_model(local), "path": str(path_or_id), "source": str(path_or_id)}


def _batch_generator(job: Job, batch: int, device: torch.device) -> torch.Generator:
    """A sampling stream per (seed, dataset, batch): a batch's tokens never depend on what ran before."""
    state = np.random.SeedSequence([job.seed, zlib.crc32(job.name.encode()), batch]).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def label(
    extractor: Extractor,
    job: Job,
    store: Path | str,
    table: Path | str | None,
    work: Path | str,
    ranks: Ranks | None = None,
) -> None:
    """Label `job` into `store` (and `table`: the rows plus what was generated), resuming from `work`.
    `store`, `table` and `work` are local paths, or fsspec URLs all three (see the module doc)."""
    ranks = ranks or Ranks()
    if is_url(store):
        _label_remote(extractor, job, str(store), None if table is None else str(table), str(work), ranks)
        return
    parts, done = work / "store.zarr", work / "done"
    arrays = _start_or_resume(extractor, job, work) if ranks.rank == 0 else None
    ranks.barrier()  # the store exists before any rank writes into it

    shards = [s for s in range(job.shards) if s % ranks.world == ranks.rank and not (done / f"{s}").exists()]
    _label_shards(
        extractor,
        job,
        shards,
        _open_arrays(parts) if arrays is None else arrays,
        lambda shard, result, arrays: _write_shard(job, shard, result, arrays, work, extractor.decode),
        ranks,
    )
    ranks.barrier()  # every shard is written before rank 0 looks
    if ranks.rank == 0:
        _finish(job, work, store, table)


def _label_shards(
    extractor: Extractor,
    job: Job,
    shards: list[int],
    arrays: dict[str, zarr.Array],
    write: Callable[[int, Extracted, dict[str, zarr.Array]], None],
    ranks: Ranks,
) -> None:
    """Compute `shards` and `write` each into the store's `arrays`, one shard behind in a writer thread."""
    todo = sum(hi - lo for lo, hi in map(job.shard_span, shards))
    freeze_heap()  # again for direct callers of `label` (O(1); see latentlab.common.heap)
    keep_freed_memory()  # each batch reuses the pages the last one freed, not fresh ones faulted in
    # one writer thread: shard s is compressed and written while shard s + 1 is computed
    with (
        progress(None, f"label {job.name}", total=todo, unit="row", disable=ranks.rank != 0) as bar,
        ThreadPoolExecutor(1) as writer,
    ):
        started, positions, pending = time.perf_counter(), 0, None

        def tick(rows: int, pooled_positions: int) -> None:
            nonlocal positions
            positions += pooled_positions
            bar.set_postfix_str(f"{positions / (time.perf_counter() - started):,.0f} tokens/s", refresh=False)
            bar.update(rows)

        for shard in shards:
            result = _extract_shard(extractor, job, shard, tick)
            if pending is not None:
                pending.result()  # at most two shards in memory; a write error stops the run here
            pending = writer.submit(write, shard, result, arrays)
        if pending is not None:
            pending.result()


def _start_or_resume(extractor: Extractor, job: Job, work: Path) -> dict[str, zarr.Array] | None:
    """Keep an unfinished run of the very same job (None); anything else in `work` is stale and goes,
    and the job's empty store takes its place: its arrays, open (nothing to read back)."""
    parts, done = work / "store.zarr", work / "done"
    try:
        same = zarr.open_group(parts, mode="r", zarr_format=3).attrs.get("fingerprint") == job.fingerprint
    except Exception:  # missing or damaged: start over
        same = False
    if same:
        print(f"label {job.name}: resuming, {len(list(done.iterdir()))} of {job.shards} shard(s) already done")
        return None
    shutil.rmtree(work, ignore_errors=True)
    done.mkdir(parents=True)
    nodes = _store_nodes(extractor, job)
    with atomic_output(parts) as partial:  # a kill while creating leaves no half-made store to resume
        write_store(partial, nodes)
    return store_arrays(parts, nodes)


def _store_nodes(extractor: Extractor, job: Job) -> dict:
    """The metadata of the job's empty store, flagged incomplete (nothing written yet)."""
    return store_metadata(
        job.rows.height,
        len(job.cfg.layers),
        extractor.hidden_size,
        job.width if job.cfg.store_tokens else None,
        job.attributes(extractor),
        job.cfg.batch_size,
        job.cfg.shard_rows,
        job.cfg.compression,
    )


def _open_arrays(location: Path | str) -> dict[str, zarr.Array]:
    """The arrays of an existing store, open for writing (each open reads its metadata)."""
    group = zarr.open_group(location, mode="r+", zarr_format=3)
    return {name: group[name] for name in group.array_keys()}


def _extract_shard(extractor: Extractor, job: Job, shard: int, tick: Callable[[int, int], None]) -> Extracted:
    """One shard, batch by batch, in row order.

    The rows run shortest first (a stable sort by length), so a batch holds rows of one length or
    nearly: little padding, and a batch with none runs attention with no mask (SDPA's fused kernel;
    `benchmarks/label.py --grouping-only`: 1.03-1.19x on the default model). Which rows share a batch depends on
    the shard alone, and each batch samples from its own seeded stream, so a shard's result does not
    depend on which shards ran before it."""
    lo, hi = job.shard_span(shard)
    batch_size = job.cfg.batch_size
    prompts = job.prompts[lo:hi]
    completions = job.completions[lo:hi] if job.completions is not None else None
    lengths = prompts.lengths + (completions.lengths if completions is not None else 0)
    order = np.argsort(lengths, kind="stable")
    prompts = prompts.take(order)
    if completions is not None:
        completions = completions.take(order)
    results = []
    for start in range(0, hi - lo, batch_size):
        stop = min(start + batch_size, hi - lo)
        generator = _batch_generator(job, (lo + start) // batch_size, extractor.device)
        batch_completions = completions[start:stop] if completions is not None else None
        result = extractor(prompts[start:stop], generator, job.cfg.store_tokens, job.width, batch_completions)
        results.append(result)
        tick(stop - start, int(result.counts.sum()))
    return Extracted.in_row_order(results, order)


def _write_shard(
    job: Job,
    shard: int,
    result: Extracted,
    arrays: dict[str, zarr.Array],
    work: Path,
    decode: Callable[[TokenRows], list[str]],
) -> None:
    """Write a shard whole (every shard file is written exactly once), its rows, then its done-marker."""
    rows = _shard_rows(job, shard, result, arrays, decode)
    with atomic_output(work / "rows" / f"{shard}.parquet") as partial:
        rows.write_parquet(partial)
    (work / "done" / f"{shard}").touch()  # last: a marker always means a whole shard


def _shard_rows(
    job: Job,
    shard: int,
    result: Extracted,
    arrays: dict[str, zarr.Array],
    decode: Callable[[TokenRows], list[str]],
) -> pl.DataFrame:
    """Write a shard's arrays into the store; returns its rows plus what was generated."""
    lo, hi = job.shard_span(shard)
    counts = result.counts.numpy().astype(np.int32)
    arrays["pooled"][lo:hi] = result.pooled.numpy()
    arrays["ids"][lo:hi] = job.rows["id"][lo:hi].to_numpy()
    arrays["n_positions"][lo:hi] = counts
    if job.cfg.store_tokens:
        arrays["tokens"][lo:hi] = result.tokens.numpy()
    extra = {"n_positions": pl.Series(counts, dtype=pl.Int32)}
    if result.token_ids is not None:  # generated: the text and what it took
        extra |= {
            "text_generated": pl.Series(decode(result.token_ids), dtype=pl.String),
            "token_ids": pl.from_arrow(result.token_ids.to_arrow()),  # List(Int32) in every shard
            "n_tokens": pl.Series(counts, dtype=pl.Int32),
            "ended": pl.Series(result.ended.numpy(), dtype=pl.Boolean),
            "log_prob": pl.Series(result.log_prob.numpy(), dtype=pl.Float32),
        }
    return job.rows[lo:hi].with_columns(**extra)


def _finish(job: Job, work: Path, store: Path, table: Path | None) -> None:
    """Flag the store complete and move it (and the row table) into place; only then drop the work."""
    missing = [s for s in range(job.shards) if not (work / "done" / f"{s}").exists()]
    if missing:
        raise RuntimeError(f"label {job.name}: shards {missing} were not written; rerun to resume")
    if table is not None:  # the table first: killed before the store moves, a rerun only finishes
        files = [work / "rows" / f"{s}.parquet" for s in range(job.shards)]
        with atomic_output(table) as partial:
            if len(files) == 1:  # one shard: its rows are the table (copied: a rerun after a kill still finds them)
                shutil.copyfile(files[0], partial)
            else:  # streamed, shard after shard, in order
                pl.scan_parquet(files).sink_parquet(partial)
    zarr.open_group(work / "store.zarr", mode="r+", zarr_format=3).attrs["complete"] = True
    with atomic_output(store) as partial:
        shutil.move(work / "store.zarr", partial)  # a rename when work and store share a file system
    shutil.rmtree(work)


def _label_remote(extractor: Extractor, job: Job, store: str, table: str | None, work: str, ranks: Ranks) -> None:
    """`label` for a store at a URL: written in place, the work beside it on the same storage (module doc)."""
    fs, root = filesystem(work)
    nodes, created = _store_nodes(extractor, job), False
    if ranks.rank == 0:
        fs.invalidate_cache()
        try:
            same = fs.exists(f"{root}/started") and (
                zarr.open_group(store, mode="r", zarr_format=3).attrs.get("fingerprint") == job.fingerprint
            )
        except Exception:  # missing or damaged: start over
            same = False
        if same:
            done = len(fs.find(f"{root}/done"))
            print(f"label {job.name}: resuming, {done} of {job.shards} shard(s) already done")
        else:
            if fs.exists(root):
                fs.rm(root, recursive=True)
            write_store(store, nodes)  # replaces the old store, if any
            created = True
            fs.touch(f"{root}/started")  # the empty store is whole: from here on a rerun resumes
    ranks.barrier()
    fs.invalidate_cache()
    done = {int(path.rsplit("/", 1)[1]) for path in fs.find(f"{root}/done")}
    shards = [s for s in range(job.shards) if s % ranks.world == ranks.rank and s not in done]

    def write(shard: int, result: Extracted, arrays: dict[str, zarr.Array]) -> None:
        rows = _shard_rows(job, shard, result, arrays, extractor.decode)
        with fs.open(f"{root}/rows/{shard}.parquet", "wb") as file:  # one object, whole or absent
            rows.write_parquet(file)
        fs.touch(f"{root}/done/{shard}")  # last: a marker always means a whole shard

    arrays = store_arrays(store, nodes) if created else _open_arrays(store)
    _label_shards(extractor, job, shards, arrays, write, ranks)
    ranks.barrier()
    if ranks.rank != 0:
        return
    fs.invalidate_cache()
    missing = [s for s in range(job.shards) if not fs.exists(f"{root}/done/{s}")]
    if missing:
        raise RuntimeError(f"label {job.name}: shards {missing} were not written; rerun to resume")
    if table is not None:  # the table first: killed before the flag, a rerun only finishes
        rows = pl.concat([pl.read_parquet(fs.cat_file(f"{root}/rows/{s}.parquet")) for s in range(job.shards)])
        with fsspec.open(table, "wb") as file:
            rows.write_parquet(file)
    zarr.open_group(store, mode="r+", zarr_format=3).attrs["complete"] = True  # last: zarr.json replaced whole
    fs.rm(root, recursive=True)
