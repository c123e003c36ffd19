"""Checkpoint loading throughput: sllm's loader from the SSD and DRAM tiers against the loaders a
user would pick instead, and against this machine's limits measured in the same run.

    .venv/bin/python -m bench.loading [--models smollm2,synthetic] [--synthetic-gb 2.2]
                                      [--repeat 3] [--data DIR] [--skip-peers] [--json]
                                      [--device cpu|cuda:N]

Run it as root: cold rows drop the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``)
before each timed load; where the machine refuses, the cold rows are left out and the output says
so. Warm rows load once untimed, then time the next loads (the files sit in the page cache).

Models (every loader reads the same tensors, stored in each loader's own format):

- ``smollm2``: the real SmolLM2-135M-Instruct of the model store, float32 (538 MB; imported
  first when missing). Its tied ``lm_head.weight`` is stored once, as the embedding.
- ``synthetic``: a Llama of hidden 2048, intermediate 5632, 32 heads (4 KV heads), vocab 32000,
  bfloat16, random weights, with as many layers as make ``--synthetic-gb`` (22 layers: 2.2 GB,
  the shape of TinyLlama-1.1B).

The files are written once under ``--data`` (default ``$SLLM_HOME/bench-data``) and reused: an
sllm checkpoint, ``hf/model.safetensors`` with ``hf/config.json``, and ``model.pt``. SmolLM2's
sllm checkpoint is the store's own.

Rows (``seconds``: median of ``--repeat`` runs, from calling the loader until every weight is in
memory and usable; ``GB/s``: the model's weight bytes over that). Each loader first loads once
untimed, so one-time costs (lazy imports, first calls) are not counted as loading:

- ``native_loader`` tier ``ssd``: ``load_checkpoint(path, pool=pool)`` on a ``DramPool`` that
  does not hold the checkpoint, so it is read from the data files into the pool's pre-faulted
  memory. One pool per model, allocated and pre-faulted untimed (an invoker does it once at
  start-up) and emptied before each of these loads; its very first load, into memory nothing
  had been read into yet, is reported in the note (slower on this VM);
- ``native_loader`` tier ``dram``: the next ``load_checkpoint`` of the same checkpoint on the
  same pool, served from the pool;
- ``native_loader-nopool`` tier ``ssd``: ``load_checkpoint(path)`` without a pool, into memory
  allocated by the load (so it pays the kernel's first-touch page faults, as every peer does);
- ``safetensors``: ``safetensors.torch.load_file(file, device="cpu")``;
- ``torch.load``: ``torch.load(file, map_location="cpu", weights_only=True)`` (its default,
  non-mmap mode);
- ``from_pretrained``: ``AutoModelForCausalLM.from_pretrained(dir, dtype=<checkpoint dtype>)``,
  so this row includes building the model (transformers is imported before timing);
- ``runai-model-streamer``: ``SafetensorsStreamer().stream_file(file)`` then every tensor of
  ``get_tensors()`` (owned tensors, default concurrency and memory limit);
- ``fastsafetensors``: ``SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)``,
  ``add_filenames``, ``copy_files_to_device()``, then ``get_tensor`` of every key (its
  documented CPU / no-GDS path);
- ``limit`` tier ``ssd``: ``fio`` sequential read with O_DIRECT in 4 MiB blocks of the model's
  own sllm data files (one job per file, one after another): median of ``--repeat`` runs of
  the fastest of ``psync``, ``libaio`` at ``--iodepth`` 8, 32 and 128, ``psync --numjobs=4``,
  and ``io_uring --fixedbufs`` at ``--iodepth`` 64 and 128 (the note names the winner and every
  variant's figure; this machine's virtual disk gets faster with more requests in flight);
  without ``fio``, a Python O_DIRECT read of the same files, labelled so;
- ``limit`` tier ``dram``: ``numpy.copyto`` between two pre-faulted arrays of the model's size,
  best of 3.

With ``--device cuda:N`` every loader puts the weights on that GPU: sllm's loader with
``load_checkpoint(..., device=...)`` (SSD tier: read into the pool block and copied chunk by chunk
as each is verified; DRAM tier: one copy from the pool; no pool: through the ring of page-locked
staging chunks), ``safetensors`` with ``device=``, ``torch.load`` with ``map_location=``,
``from_pretrained`` with ``device_map=``, the other peers' tensors moved with ``.to(device)``
(fastsafetensors loads to the device itself). A row ends with ``torch.cuda.synchronize()``
instead of the page touching (device memory is never mapped lazily), so ``touch_seconds`` is 0.
The limits gain ``limit`` tier ``h2d``: ``Tensor.copy_`` of the model's bytes from page-locked
host memory to the GPU, best of 3. Rows that read from memory are compared with it, and rows
with tier ``ssd`` with the slower of fio and h2d (the bytes cross both). Target: the DRAM tier
at least 80% of h2d.

"Usable": some loaders map the file and read it only when a page is first touched
(``safetensors`` on CPU, ``from_pretrained``), so every row, sllm's included, ends by reading one
byte of every 4 KiB page of every tensor (and its last byte); that pass is inside the timed region
and reported on its own as ``touch_seconds``. Rows with tier ``ssd`` are compared with the fio
limit; rows that read from memory (the DRAM tier, and the peers' warm rows, which read the page
cache, shown as tier ``page-cache``) with the memcpy limit. Targets: the SSD tier cold at least
90% of fio, the DRAM tier at least 80% of memcpy.

A peer that cannot be imported or fails keeps its row, with the reason and no figure. The
header reports what other processes did during the run (disk bytes read, CPU seconds) and says
BUSY when they were enough to lower the figures.
``--json`` prints one JSON object per row (``loader``, ``tier``, ``cache``, ``model``, ``bytes``,
``seconds``, ``gbps``, ``limit``, ``pct_of_limit``, ``runs``, ``touch_seconds``, ``note``); the
limit rows have ``loader: "limit"``; every row also has ``device``.

Where each part lives (``bench/loading/``; ``--help`` prints the text above, not this list):

- :mod:`bench.loading.__main__`: the command: its options, one model's rows measured and set
  against their limit, the output;
- :mod:`bench.loading.models`: the checkpoints every loader reads (SmolLM2 from the model store,
  the synthetic Llama), written once in each loader's format;
- :mod:`bench.loading.row`: one row of the output (its runs, limit and JSON form);
- :mod:`bench.loading.timing`: timing one load until usable, the page touching, freeing it;
- :mod:`bench.loading.native`: sllm's loader rows (SSD tier through the pool, DRAM tier, no pool);
- :mod:`bench.loading.peers`: the other loaders (safetensors, ``torch.load``,
  ``from_pretrained``, runai-model-streamer, fastsafetensors) and their rows;
- :mod:`bench.loading.limits`: the machine's limits (fio or the Python O_DIRECT read, memcpy,
  host-to-device copy);
- :mod:`bench.loading.neighbours`: what other processes did during the run (disk reads, CPU);
- :mod:`bench.loading.report`: the header, the table and the targets;
- :mod:`bench.stats` (shared by the benchmarks): the median, the machine's memory;
  :mod:`bench.pagecache`: dropping the page cache.
"""

from __future__ import annotations

LAYOUT_HEADING = "\nWhere each part lives"
"""Where the docstring's list of modules starts: ``--help`` prints the docstring up to it."""
