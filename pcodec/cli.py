"""Command-line interface (click). Only argument handling lives here; torch is imported only
by the commands that run a network (encode, decode, bench, train), so `--help`, `info` and
`truncate` start instantly."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click

from . import __version__, api, container
from .errors import PcodecError, UsageError

STDIO = "-"
EXIT_CODES = """\b
Exit codes:   0 done            1 runtime or I/O error (unreadable input, disk full, ...)
              2 usage error     3 corrupt, truncated or unsupported stream
              4 model not installed
            130 interrupted (SIGINT), 129 (SIGHUP), 143 (SIGTERM): no output left half-written
"""
WORKER_GRACE_SECONDS = 0.6  # a worker still busy after SIGTERM this long is killed


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: a BaseException, like KeyboardInterrupt, so that every
    cleanup runs on the way out and no `except Exception` takes it for an error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _signal_of(stop: BaseException) -> int:
    """The signal behind an Interrupted, a KeyboardInterrupt or click's Abort (Ctrl-C)."""
    return stop.signum if isinstance(stop, Interrupted) else signal.SIGINT


_progress_shown = False  # a progress bar is on the terminal's last line


def _say(message: str):
    global _progress_shown
    if _progress_shown:  # the bar is redrawn after the message
        click.echo("\r\033[K", nl=False, err=True)
        _progress_shown = False
    click.echo(message, err=True)


class Batch:
    """Runs one action per input, going on past failures; remembers the worst exit code.

    An action returns its one line of statistics (or None). With jobs > 1 the actions run in
    that many worker processes, each with its share of the cores; with several inputs and a
    terminal on stderr a progress bar follows the statistics lines.
    """

    def __init__(self, quiet: bool, total: int = 1, jobs: int = 1):
        self.quiet = quiet
        self.total = total
        self.jobs = max(1, min(jobs, total))
        self.exit_code = 0
        self.failed = 0
        self.done = 0
        self.started = time.perf_counter()
        self.progress = total > 1 and not quiet and sys.stderr.isatty()

    def run(self, name: str, action):
        self._report(*_outcome(action, name))

    def run_all(self, function, inputs, *args, outputs=None):
        """function(path, *args) for every input: module-level, so workers can run it.
        `outputs(path)` names where an input's result goes, so that the temporaries of
        workers killed on an interrupt can be removed."""
        if self.jobs == 1:
            for path in inputs:
                self.run(path, lambda path=path: function(path, *args))
            return
        from concurrent.futures import ProcessPoolExecutor

        from .worker_processes import QuietStartContext

        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        # The workers' share of the cores: numpy's BLAS and torch read OMP_NUM_THREADS when
        # they load, which in a spawned worker is after it starts with this environment.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        pool = ProcessPoolExecutor(self.jobs, QuietStartContext(), initializer=worker_setup,
                                   initargs=(os.getpid(), ignored_stop_signals()))
        futures = [pool.submit(_in_worker, function, path, *args) for path in inputs]
        try:
            for future in futures:
                self._report(*future.result())
        except BaseException:
            _stop_workers(pool)
            for path, future in zip(inputs, futures):
                if not future.done() and outputs is not None:
                    _remove_temporaries(outputs(path))
            raise
        pool.shutdown()

    def _report(self, message, failure):
        global _progress_shown
        self.done += 1
        if failure is not None:
            _say(failure[0])
            self.exit_code = self.exit_code or failure[1]
            self.failed += 1
        elif message and not self.quiet:
            _say(message)
        if self.progress and self.done < self.total:
            width, elapsed = 30, time.perf_counter() - self.started
            filled = width * self.done // self.total
            eta = elapsed / self.done * (self.total - self.done)
            click.echo(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                       f"{elapsed:.0f} s, {eta:.0f} s left", nl=False, err=True)
            _progress_shown = True

    def finish(self):
        if self.total > 1 and not self.quiet:
            _say(f"pcodec: {self.total - self.failed} of {self.total} inputs done, {self.failed} "
                 f"failed, {time.perf_counter() - self.started:.1f} s")
        sys.exit(self.exit_code)


def _stop_workers(pool):
    """SIGTERM to every worker (each removes its temporary and exits), SIGKILL to any still
    there after WORKER_GRACE_SECONDS (inside a long torch call it cannot take the signal)."""
    processes = list(getattr(pool, "_processes", {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + WORKER_GRACE_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)
    pool.shutdown(wait=False, cancel_futures=True)


def _remove_temporaries(output: str | None):
    """What imageio.write_bytes of a killed worker may have left for `output`."""
    if output is None or output == STDIO:
        return
    target = Path(output)
    for leftover in (target.parent if str(target.parent) else Path(".")).glob(
            f".{target.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


_worker_busy = False  # a worker is running a job (else a signal ends it at once)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def ignored_stop_signals() -> tuple:
    """The stop signals this process ignores for good (a shell's background job's SIGINT,
    nohup's SIGHUP): its workers must keep ignoring them."""
    return tuple(signum for signum in STOP_SIGNALS if signal.getsignal(signum) is signal.SIG_IGN)


def worker_setup(parent: int, ignored=()):
    try:  # Linux: the kernel sends SIGTERM to this worker when its parent dies, however
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before that was set
        os._exit(143)
    for signum in STOP_SIGNALS:
        # A signal the parent was started ignoring (SIGINT in a shell's background job) the
        # workers ignore too: else a Ctrl-C the parent rightly ignores would kill them alone.
        if signum not in ignored:
            signal.signal(signum, _worker_signal)


def _worker_signal(signum, frame):
    if not _worker_busy:
        os._exit(128 + signum)
    raise Interrupted(signum)  # unwinds the job: its temporary output is removed


def _outcome(action, name: str):
    """(statistics line, None) or (None, (error line, exit code)): errors as text, so they
    can also cross back from a worker process. Each error line names its input."""
    label = "stdin" if name == STDIO else name
    try:
        return action(), None
    except PcodecError as error:
        message = str(error)
        if not message.startswith((f"{label}:", f"{name}:")):
            message = f"{label}: {message}"
        return None, (f"pcodec: error: {message}", error.exit_code)
    except MemoryError:
        return None, (f"pcodec: error: {label}: out of memory", 1)


def _in_worker(function, path, *args):
    global _worker_busy
    _worker_busy = True
    try:
        return _outcome(lambda: function(path, *args), path)
    except Interrupted as interrupted:
        os._exit(128 + interrupted.signum)  # cleanup ran on the way here; never take another job
    finally:
        _worker_busy = False


def _output_for(input_path: str, output: str | None, total: int, default_suffix: str) -> str:
    """Where one input's result goes: -o as given (a folder when several inputs are given or
    -o is a folder), else a name next to the input; stdin goes to stdout. An existing file
    is an error unless -f/--force."""
    base = "stdin" if input_path == STDIO else Path(input_path).name
    if output is not None and (total > 1 or _is_folder(output)):
        return str(Path(output) / (Path(base).stem + default_suffix))
    if output is not None:
        return output
    if input_path == STDIO:
        return STDIO
    path = Path(input_path)
    return str(path.with_name(path.stem + default_suffix))


def _is_folder(output: str) -> bool:
    return output != STDIO and (output.endswith(os.sep) or Path(output).is_dir())


def _prepare_folder(output: str | None, total: int):
    """Create -o's folder once, before any input is coded, when it names one."""
    if output is None or output == STDIO:
        if output == STDIO and total > 1:
            raise UsageError("-o -: several inputs cannot all go to stdout")
        return
    if total == 1 and not _is_folder(output):
        return
    if Path(output).exists() and not Path(output).is_dir():
        raise UsageError(f"-o {output}: not a folder (several inputs need one)")
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"-o {output}: cannot create the folder ({error.strerror})") from None


def _parallel_jobs(inputs, jobs: int) -> int:
    """Workers name their outputs independently: with inputs of one file stem (a/x.png, b/x.png)
    or stdin, which of two claims on one name fails would be a race, so those batches run in
    one process (the second is then always the one told that its output exists)."""
    stems = [Path(path).stem for path in inputs]
    return jobs if STDIO not in inputs and len(set(stems)) == len(stems) else 1


def _check_not_input(input_path: str, output: str):
    from .imageio import same_file

    if same_file(input_path, output):
        raise UsageError(f"{output}: refusing to overwrite the input")


def _stats(name: str, output: str, size: int, width: int, height: int, layers: int, seconds: float,
           extra: str = "") -> str:
    target = "stdout" if output == STDIO else output
    return (f"{name} -> {target}: {size} bytes, {8 * size / (width * height):.4f} bpp, "
            f"{width}x{height}, {layers} layers{extra}, {seconds:.2f} s")


max_pixels_option = click.option(
    "--max-pixels", type=click.IntRange(min=1), default=None,
    help="Refuse images larger than this many pixels [default: 33554432, or $PCODEC_MAX_PIXELS].")
force_option = click.option("-f", "--force", is_flag=True,
                            help="Replace output files that exist (else each is an error).")
quiet_option = click.option("-q", "--quiet", is_flag=True, default=False,
                            help="No statistics or warnings on stderr.")
device_option = click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
    help="Where the transforms run; probabilities and coding stay on the CPU, so streams "
         "decode the same anywhere.")
jobs_option = click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                           help="Worker processes for several inputs (they share the cores).")


class _Group(click.Group):
    def invoke(self, ctx):
        """Ctrl-C and the signals leave click as Interrupted, which run() reports: click's own
        handling would print an empty line before its "Aborted!"."""
        try:
            return super().invoke(ctx)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise Interrupted(signal.SIGINT) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES)
@click.version_option(__version__, "-V", "--version", prog_name="pcodec")
@quiet_option
@click.pass_context
def main(ctx, quiet):
    """pcodec: a progressive learned image codec. One embedded .pcb stream per image; any
    prefix of it (after a layer, or at any byte) decodes to the best image it allows."""
    ctx.obj = {"quiet": quiet}


def _quiet(obj: dict, quiet: bool) -> bool:
    """-q before or after the command name."""
    return obj["quiet"] or quiet


@main.command(epilog=EXIT_CODES)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output file, '-' for stdout, or a folder (created if "
              "needed; several inputs need one).")
@click.option("--model", "model_id", default=None, help="Model id from models/manifest.json.")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Code only the first K layers [default: all].")
@click.option("--bytes", "max_bytes", type=click.IntRange(min=1), default=None,
              help="At most N bytes per file (the stream is cut there, as truncate does).")
@click.option("--bpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="At most B bits per pixel per file (the same cut, sized per image).")
@click.option("--layer-bpp", callback=lambda ctx, param, value: _parse_layer_bpp(value),
              default=None, metavar="B1,B2,...",
              help="Quality layers that end at these file sizes in bits per pixel, as JPEG "
              "2000's rate layers do (increasing; the rest of the stream is one more layer), "
              "or 'none': one layer per quantization layer [default: the model's rates].")
@click.option("--refine", type=click.IntRange(min=0, max=10000), default=0, show_default=True,
              metavar="STEPS", help="Refine each image's latent by STEPS gradient steps: "
              "smaller files for the same quality at every layer, about 1.5 s per step for a "
              "768x512 image on 2 cores (40 steps: about 5 % fewer bits on Kodak).")
@max_pixels_option
@force_option
@device_option
@jobs_option
@quiet_option
@click.pass_obj
def encode(obj, inputs, output, model_id, layers, max_bytes, bpp, layer_bpp, refine, max_pixels,
           force, device, jobs, quiet):
    """Encode images (PNG, JPEG, TIFF, BMP, PPM, WebP, ...; '-' for stdin) to .pcb streams."""
    if max_bytes is not None and bpp is not None:
        raise click.UsageError("give --bytes or --bpp, not both")
    quiet = _quiet(obj, quiet)
    _prepare_folder(output, len(inputs))
    batch = Batch(quiet, len(inputs), _parallel_jobs(inputs, jobs))
    batch.run_all(_encode_one, inputs, output, len(inputs), model_id, layers, max_pixels,
                  force, quiet, device, max_bytes, bpp, refine, layer_bpp,
                  outputs=lambda path: _output_for(path, output, len(inputs), ".pcb"))
    batch.finish()


def _parse_layer_bpp(value):
    """--layer-bpp: None (the model's), () for 'none', or the increasing positive rates."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    try:
        rates = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected rates like 0.15,0.3,0.6 or 'none'") from None
    if not (rates and all(0 < a < b for a, b in zip(rates, rates[1:] + (float("inf"),)))
            and len(rates) < container.MAX_LAYERS):
        raise click.BadParameter(f"{value!r}: rates must be positive and increasing "
                                 f"(at most {container.MAX_LAYERS - 1})")
    return rates


def _encode_one(path, output, total, model_id, layers, max_pixels, force, quiet,
                device="cpu", max_bytes=None, bpp=None, refine=0, layer_bpp=None) -> str:
    from . import engine, models
    from .imageio import check_free, read_image, write_bytes
    from .imageio import max_pixels as pixel_limit

    start = time.perf_counter()
    out = _output_for(path, output, total, ".pcb")
    _check_not_input(path, out)
    check_free(out, force)
    pixels = read_image(path, pixel_limit(max_pixels),
                        (lambda message: None) if quiet else (lambda m: _say(f"pcodec: warning: {m}")))
    model = models.load(model_id, device)
    most = engine.most_layers(model, layer_bpp)
    if layers is not None and layers > most:
        raise UsageError(f"--layers {layers}: the streams have at most {most} layers")
    data = engine.encode(model, pixels, layers, refine, layer_bpp)
    height, width = pixels.shape[:2]
    if bpp is not None:
        max_bytes = int(bpp * width * height / 8)
        smallest = container.smallest_size(data, width * height)
        if max_bytes < smallest:
            raise UsageError(f"--bpp {bpp}: {max_bytes} bytes for this image, below its smallest "
                             f"valid stream ({smallest} bytes = "
                             f"{8 * smallest / (width * height):.4f} bpp)")
    if max_bytes is not None:
        data = container.truncate(data, None, max_bytes, width * height)
    coded_layers = container.parse_header(data, width * height)[0].layers
    write_bytes(out, data, overwrite=force)
    return _stats(path, out, len(data), width, height, coded_layers, time.perf_counter() - start)


@main.command(epilog=EXIT_CODES)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output image (type from its extension: .png .ppm .bmp "
              ".tif .webp .jpg), '-' for PNG on stdout, or a folder (created if needed; several "
              "inputs need one).")
@click.option("--layers", type=click.IntRange(min=0), default=None,
              help="Decode only the first K layers.")
@click.option("--bytes", "max_bytes", type=click.IntRange(min=1), default=None,
              help="Decode only the first N bytes of the stream, as a partial download "
                   "would give them (header included).")
@click.option("--partial", is_flag=True,
              help="Decode a stream that was cut short or damaged, as far as it is intact "
                   "(a warning says what was dropped).")
@click.option("--midpoint", is_flag=True,
              help="Reconstruct at interval midpoints instead of the conditional mean (under 2σ).")
@max_pixels_option
@force_option
@device_option
@jobs_option
@quiet_option
@click.pass_obj
def decode(obj, inputs, output, layers, max_bytes, partial, midpoint, max_pixels, force,
           device, jobs, quiet):
    """Decode .pcb streams ('-' for stdin) to images."""
    quiet = _quiet(obj, quiet)
    _prepare_folder(output, len(inputs))
    batch = Batch(quiet, len(inputs), _parallel_jobs(inputs, jobs))
    batch.run_all(_decode_one, inputs, output, len(inputs), layers, max_bytes, partial, midpoint,
                  max_pixels, force, device, quiet,
                  outputs=lambda path: _output_for(path, output, len(inputs),
                                                   _decode_suffix(layers, max_bytes)))
    batch.finish()


def _decode_suffix(layers, max_bytes) -> str:
    return ((f".l{layers}" if layers is not None else "")
            + (f".b{max_bytes}" if max_bytes is not None else "") or ".decoded") + ".png"


def _decode_one(path, output, total, layers, max_bytes, partial, midpoint, max_pixels,
                force, device="cpu", quiet=False) -> str:
    from . import engine, models
    from .imageio import check_free, encode_image, read_bytes, write_bytes
    from .imageio import max_pixels as pixel_limit

    start = time.perf_counter()
    out = _output_for(path, output, total, _decode_suffix(layers, max_bytes))
    _check_not_input(path, out)
    check_free(out, force)
    data = read_bytes(path)
    limit = pixel_limit(max_pixels)
    header, _ = container.parse_header(data, limit)
    if layers is not None and layers > header.layers:
        raise UsageError(f"--layers {layers}: the stream has {header.layers} layers")
    model = models.load(header.model_id, device)
    decoded = engine.decode_detailed(model, data, layers, max_bytes, partial, not midpoint, limit)
    write_bytes(out, encode_image(decoded.pixels, out), overwrite=force)
    wanted = header.layers if layers is None else layers
    cut_inside = decoded.last_layer_cut
    if partial and not quiet and max_bytes is None and (decoded.layers < wanted or cut_inside):
        whole = decoded.layers - cut_inside
        _say(f"pcodec: warning: {path}: stream cut or damaged: {whole} of {wanted} layers "
             f"whole{f', layer {decoded.layers} in part' if cut_inside else ''}")
    return _stats(path, out, decoded.bytes_used, header.width, header.height, decoded.layers,
                  time.perf_counter() - start, " (last layer partial)" if cut_inside else "")


@main.command(epilog=EXIT_CODES)
@click.argument("input_path", metavar="INPUT", default=STDIO)
@click.option("-o", "--output", default=STDIO, help="Output stream [default: stdout].")
@click.option("--layers", type=click.IntRange(min=0), default=None, help="Keep the first K layers.")
@click.option("--bytes", "max_bytes", type=click.IntRange(min=1), default=None,
              help="Keep at most N bytes in all (a layer may be cut inside).")
@click.option("--partial", is_flag=True, help="Accept a stream that was cut short or damaged.")
@max_pixels_option
@force_option
@quiet_option
@click.pass_obj
def truncate(obj, input_path, output, layers, max_bytes, partial, max_pixels, force, quiet):
    """Cut a .pcb stream to a valid, smaller .pcb stream without re-encoding
    (a filter: stdin to stdout when no file is named)."""
    from .imageio import check_free, read_bytes, write_bytes
    from .imageio import max_pixels as pixel_limit

    if layers is None and max_bytes is None:
        raise click.UsageError("give --layers K and/or --bytes N")
    batch = Batch(_quiet(obj, quiet))

    def one():
        _check_not_input(input_path, output)
        check_free(output, force)
        data = read_bytes(input_path)
        header, _ = container.parse_header(data, pixel_limit(max_pixels))
        if layers is not None and layers > header.layers:
            raise UsageError(f"--layers {layers}: the stream has {header.layers} layers")
        result = container.truncate(data, layers, max_bytes, pixel_limit(max_pixels), partial)
        write_bytes(output, result, overwrite=force)
        header, _ = container.parse_header(result, pixel_limit(max_pixels))
        return (f"{input_path} -> {'stdout' if output == STDIO else output}: {len(data)} -> "
                f"{len(result)} bytes, {8 * len(result) / (header.width * header.height):.4f} "
                f"bpp, {header.layers} layers")

    batch.run(input_path, one)
    batch.finish()


@main.command(epilog=EXIT_CODES)
@click.argument("inputs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document per input on stdout.")
@click.option("--partial", is_flag=True,
              help="Describe a stream that was cut short or damaged, as far as it is intact.")
@max_pixels_option
@quiet_option
@click.pass_obj
def info(obj, inputs, as_json, partial, max_pixels, quiet):
    """Show the header, layers and sizes of .pcb streams."""
    from .imageio import max_pixels as pixel_limit
    from .imageio import read_bytes

    batch = Batch(_quiet(obj, quiet), len(inputs))

    def one(path):
        document = {"file": path, **api.info(read_bytes(path), pixel_limit(max_pixels), partial)}
        if as_json:
            click.echo(json.dumps(document))
            return
        d = document
        click.echo(f"{path}: pcb v{d['format_version']}, {d['width']}x{d['height']}, model "
                   f"{d['model']} ({d['weights_digest']}), {d['layers']} layers, "
                   f"{d['total_bytes']} bytes ({d['bpp']} bpp), {d['status']}")
        click.echo(f"  header            {d['header_bytes']:>9} bytes")
        for entry in d["sections"]:
            flag = " partial" if entry["partial"] else ""
            click.echo(f"  {entry['name']:<16}  {entry['bytes']:>9} bytes  up to "
                       f"{entry['cumulative_bytes']:>9} bytes = {entry['cumulative_bpp']:.4f} bpp"
                       f"  crc {entry['crc32']}{flag}")
        for entry in d["quality_layers"]:  # layers formed by rate end inside the sections
            click.echo(f"  quality layer {entry['layer']:<3} ends at {entry['cumulative_bytes']:>9} "
                       f"bytes = {entry['cumulative_bpp']:.4f} bpp")

    for path in inputs:
        batch.run(path, lambda path=path: one(path))
    batch.finish()


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=Path("bench-output"),
              show_default=True, help="Where bench.json and rd.png go.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N images.")
@click.option("--cuts", type=click.IntRange(min=2), default=50, show_default=True,
              help="Byte offsets per pcodec stream (log-spaced).")
@click.option("--codec", "codecs", multiple=True,
              help="Only codecs whose name contains this (repeatable; 'pcodec' for ours).")
@click.option("--reuse", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Take the codecs not run now from an earlier bench.json.")
@click.option("--speed", is_flag=True,
              help="Measure speed instead: stage times, images/s, start-up, peak memory.")
@click.option("--nesting", is_flag=True,
              help="Measure instead what the nested quantizer costs against a plain uniform "
                   "one at the same PSNR (ideal code lengths; slow: ~40 s per Kodak image).")
@click.option("--refine", type=click.IntRange(min=0, max=10000), default=0, show_default=True,
              metavar="STEPS", help="Encode pcodec's streams with --refine STEPS.")
def bench(folder, out_dir, limit, cuts, codecs, reuse, speed, nesting, refine):
    """Rate–distortion and speed of pcodec and the classical codecs on a folder of images."""
    from . import bench as bench_module

    if speed:
        result = bench_module.run_speed(folder, out_dir, limit or 8)
        click.echo(bench_module.speed_table(result))
        click.echo(f"\n{out_dir}/speed.json")
        return
    if nesting:
        result = bench_module.run_nesting(folder, out_dir, limit)
        click.echo(bench_module.nesting_table(result))
        click.echo(f"\n{out_dir}/nesting.json")
        return
    result = bench_module.run_bench(folder, out_dir, limit, cuts, list(codecs) or None,
                                    progress=sys.stderr.isatty(), reuse=reuse, refine=refine)
    click.echo(bench_module.table(result))
    for codec, source in sorted(result["reused_from"].items()):
        click.echo(f"{codec}: rows reused from {source}")
    click.echo(f"\n{out_dir}/bench.json, {out_dir}/rd.png")


@main.command(add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def train(ctx):
    """Train a model (see `pcodec train --help`)."""
    from .train import main as train_main

    train_main(ctx.args)


def run():
    """Entry point: no traceback ever reaches the user. SIGTERM and SIGHUP end the process
    as Ctrl-C does: every temporary removed, every worker stopped, exit 128 + the signal. A
    signal ignored when pcodec starts (nohup's SIGHUP, a background job's SIGINT) stays so."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(signum, _raise_interrupted)
    try:
        _run_reporting_errors()
    except (Interrupted, KeyboardInterrupt) as stop:  # a signal while an end was reported
        sys.exit(128 + _signal_of(stop))
    finally:
        # The work is done or abandoned, and said so: a signal during the interpreter's
        # shutdown (torch's finalizers take a moment) could only print a traceback.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _run_reporting_errors():
    """main(), each way it can end reported in one line and an exit code."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.UsageError as error:
        error.show()
        sys.exit(2)
    except (Interrupted, click.Abort, KeyboardInterrupt) as stop:
        signum = _signal_of(stop)
        _say(f"pcodec: interrupted ({signal.Signals(signum).name})")
        sys.exit(128 + signum)
    except PcodecError as error:
        _say(f"pcodec: error: {error}")
        sys.exit(error.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except MemoryError:
        _say("pcodec: error: out of memory")
        sys.exit(1)
    except Exception as error:  # a bug: still one line, never a traceback
        _say(f"pcodec: internal error: {type(error).__name__}: {error}")
        sys.exit(1)
