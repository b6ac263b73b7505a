"""
What train.py, finetune_long.py, sample.py, eval_ppl.py, eval_passkey.py and viz_bias.py share, so that each
policy exists once: which device and precision a run uses, and how checkpoints are written, checked
and read back (everything needed to continue a run as if it had never stopped).
"""

import json
import os
import platform
import random
import socket
import zipfile
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

from configurator import ConfigError
from model import GPT, GPTConfig

FORMAT_VERSION = 1
CHECKPOINT_KEYS = ('model', 'optimizer', 'scaler', 'model_args', 'config', 'iter_num',
                   'best_val_loss', 'rng', 'format_version')
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


class TrainError(RuntimeError):
    """A problem with the data, a checkpoint or the run itself; the message says what to do."""


# -----------------------------------------------------------------------------
# device and precision

def mps_available():
    return getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()


def available_devices():
    """The devices this machine has, for error messages: e.g. "'cpu', 'cuda' (= 'cuda:0'), 'cuda:1'"."""
    names = ["'cpu'"]
    if torch.cuda.is_available():
        names += ["'cuda' (= 'cuda:0')"] + [f"'cuda:{i}'" for i in range(1, torch.cuda.device_count())]
    if mps_available():
        names.append("'mps'")
    return ', '.join(names)



def cpu_name():
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads=0):
    """What a measurement ran on, for its results file; torch_threads: `threads` (the threads each
    command was given), else OMP_NUM_THREADS, else torch's own count in this process."""
    threads = threads or os.environ.get('OMP_NUM_THREADS') or torch.get_num_threads()
    return dict(cpu=cpu_name(), logical_cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                torch_threads=int(threads), platform=platform.platform())

def pick_device(name):
    """'auto' = the best device present; any other name must be a device this machine has (torch
    itself would only fail at the first tensor moved there, with an assertion about how it was built)."""
    if name != 'auto':
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device={name!r} is not a device name; this machine has: {available_devices()} "
                              f"(or 'auto' for the best of them)") from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}, but CUDA is not available here (no NVIDIA GPU, or a torch "
                              f"built without CUDA). This machine has: {available_devices()}; or use 'auto'")
        if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                              f"{available_devices()}")
        if device.type == 'mps' and not mps_available():
            raise ConfigError(f"device={name!r}, but MPS (Apple GPUs) is not available here. This machine has: "
                              f"{available_devices()}; or use 'auto'")
        return device
    if torch.cuda.is_available():
        return torch.device('cuda')
    if mps_available():
        return torch.device('mps')
    return torch.device('cpu')


def has_native_bfloat16(device):
    """bfloat16 in the tensor cores: NVIDIA compute capability 8.0 (Ampere) and newer. (Not
    torch.cuda.is_bf16_supported(), which also says yes where bfloat16 is only emulated, e.g. on an
    RTX 20xx or a T4: slow, and without SDPA's fused kernels. It asks about the current GPU, too.)"""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def compiles_on(device):
    """What compile='auto' decides: on CUDA GPUs, where torch.compile's default backend generates
    Triton kernels, so only if Triton is there (PyTorch's Windows wheels ship none) and the GPU is one
    Triton supports (compute capability 7.0+; not a GTX 10xx). Elsewhere the gain is small."""
    if device.type != 'cuda':
        return False
    try:
        from torch.utils._triton import has_triton  # torch's own test (a private helper)
    except ImportError:
        import importlib.util

        def has_triton():
            return importlib.util.find_spec('triton') is not None
    return has_triton() and torch.cuda.get_device_capability(device) >= (7, 0)


def pick_dtype(name, device, training=True):
    """bfloat16 where the GPU has it (same range as float32: no loss scaling needed), else float16
    with a GradScaler on CUDA; float32 on CPU and MPS, where mixed precision rarely pays off."""
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {DTYPES}")
    if name == 'auto':
        if device.type == 'cuda':
            return 'bfloat16' if has_native_bfloat16(device) else 'float16'
        return 'float32'
    if name == 'float16' and device.type != 'cuda' and training:
        raise ConfigError("dtype='float16' needs loss scaling, which this script does on CUDA only; "
                          "use 'bfloat16' or 'float32'")
    return name


def autocast_for(device, name='auto', training=False):
    """The autocast context of the dtype setting `name` ('auto': pick_dtype's choice) on `device`: the
    weights stay float32 and the matmuls run in bfloat16 or float16; float32 needs none."""
    name = pick_dtype(name, device, training)
    if name == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, name))


# -----------------------------------------------------------------------------
# checkpoints


def rng_states(batch_generator, device):
    """Every random stream: python and numpy (unused by this loop, saved for scripts that do),
    torch's (dropout on the CPU), the training GPU's (dropout there; only that GPU's: the others may
    be absent, or others, when the run resumes), and the generator that picks the training batches."""
    np_state = np.random.get_state()
    return {'python': random.getstate(),
            # the numpy array as a list keeps the checkpoint loadable with torch.load(weights_only=True)
            'numpy': (np_state[0], np_state[1].tolist()) + tuple(np_state[2:]),
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
            'batches': batch_generator.get_state()}


def set_rng_states(states, batch_generator, device):
    random.setstate(states['python'])
    np.random.set_state((states['numpy'][0], np.array(states['numpy'][1], dtype=np.uint32)) + tuple(states['numpy'][2:]))
    torch.set_rng_state(states['torch'])
    cuda = states['cuda']
    if isinstance(cuda, (list, tuple)):  # older checkpoints kept every visible GPU's: take the first
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == 'cuda':
        torch.cuda.set_rng_state(cuda, device)
    batch_generator.set_state(states['batches'])


@contextmanager
def os_errors(operation, path):
    """An OS error on a path the user gave (a full disk, a read-only folder, a file where a folder
    should be) as one line that names the path and what was being done, instead of a traceback."""
    try:
        yield
    except OSError as e:
        raise TrainError(f"cannot {operation} {path}: {e.strerror or e}") from None


def check_writable(prefix):
    """Fail now, not after an hour of evaluation, if the outputs prefix.* cannot be written."""
    folder = os.path.dirname(os.path.abspath(prefix))
    with os_errors('write the outputs to', folder):
        os.makedirs(folder, exist_ok=True)
        with open(prefix + '.write-test', 'w'):
            pass
        os.remove(prefix + '.write-test')


def save_checkpoint(checkpoint, out_dir):
    """Write to a temporary file, then rename: an interruption mid-write leaves the old ckpt.pt intact,
    and so does a failed write (a full disk), whose partial file is removed."""
    path = os.path.join(out_dir, 'ckpt.pt')
    try:
        with open(path + '.tmp', 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + '.tmp', path)  # atomic
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError ("unexpected pos")
        with suppress(OSError):
            os.remove(path + '.tmp')
        reason = getattr(e, 'strerror', None) or (str(e).strip().splitlines() or [''])[0][:120]
        raise TrainError(f"cannot write the checkpoint {path} ({reason}; is the disk full?). The previous "
                         f"ckpt.pt, if any, is intact") from None
    return path


# what to do about a damaged checkpoint, whichever script read it
REMEDY = ("restore it from a copy, or delete it and train it again (train.py or finetune_long.py with "
          "--init_from=scratch)")


def verify_archive(path):
    """torch.save writes a zip archive that holds a CRC-32 of every record, which torch.load never
    checks: a flipped bit in the weights would load silently. zipfile checks every CRC (reading the
    whole file once, ~1 s for a GPT-2-small checkpoint with its optimizer state; experiments/
    checkpoint_check_cost.py measures it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError):
        return  # not a zip archive at all (truncated, or another file): torch.load says so below
    if damaged is not None:
        raise TrainError(f"the checkpoint {path} is damaged: its record {damaged} fails its checksum (a disk or "
                         f"copy error). Nothing was read from it; {REMEDY}")


def load_checkpoint(path, required=CHECKPOINT_KEYS):
    """Read and check a ckpt.pt written by this script (onto the CPU). required: the entries it must
    have (a script that only needs the model may ask for less than resuming does)."""
    if not os.path.exists(path):
        raise TrainError(f"no checkpoint at {path}: train one first (init_from='scratch'), "
                         f"or point --out_dir at the folder that holds ckpt.pt")
    with os_errors('read the checkpoint', path):
        verify_archive(path)
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [''])[0][:200]
        what = 'truncated or corrupt (an interrupted copy?)' if zipfile.is_zipfile(path) else \
            'truncated or corrupt, or not a checkpoint at all (torch.save writes a zip archive; this file is not one)'
        raise TrainError(f"cannot read the checkpoint {path} ({type(e).__name__}: {first_line}); it is "
                         f"{what}. {REMEDY.capitalize()}") from e
    if not isinstance(checkpoint, dict):
        raise TrainError(f"{path} is not a checkpoint of this code (it holds a {type(checkpoint).__name__})")
    if 'format_version' in checkpoint and checkpoint['format_version'] != FORMAT_VERSION:
        raise TrainError(f"{path} has checkpoint format version {checkpoint['format_version']}, "
                         f"this code reads version {FORMAT_VERSION}")
    missing = [k for k in required if k not in checkpoint]
    if missing:
        raise TrainError(f"{path} lacks {', '.join(missing)}: not a checkpoint written by this train.py")
    return checkpoint


def strip_compile_prefix(state_dict):
    """A torch.compile'd model names every weight '_orig_mod.<name>'; loading must not care."""
    prefix = '_orig_mod.'
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_weights(model, checkpoint):
    """Load a checkpoint's weights into a model built from its model_args. They fit unless the
    checkpoint was edited or written by another version of model.py (a renamed layer, say): then
    say so, rather than end in load_state_dict's wall of key names."""
    state = strip_compile_prefix(checkpoint['model'])
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [f"{k} {tuple(state[k].shape)} (the model's is {tuple(v.shape)})" for k, v in expected.items()
               if k in state and state[k].shape != v.shape]
    if missing or unexpected or resized:
        def first(names):
            return ', '.join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else '')
        details = [f"{what}: {first(names)}" for what, names in
                   (('missing', missing), ('unexpected', unexpected), ('of another shape', resized)) if names]
        raise TrainError(f"the checkpoint's weights do not match its model_args "
                         f"(pos_encoding={model.config.pos_encoding!r}, n_layer={model.config.n_layer}, ...): "
                         f"{'; '.join(details)}. Was it saved by another version of model.py, or its "
                         f"model_args edited?")
    model.load_state_dict(state)
    return model


def model_from_checkpoint(checkpoint, **config_overrides):
    """The GPT of a checkpoint, on the CPU; config_overrides change e.g. attn_impl."""
    args = {**checkpoint['model_args'], **config_overrides}
    unknown = sorted(set(args) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise TrainError(f"the checkpoint's model_args has fields {unknown} that this model.py's GPTConfig "
                         f"lacks: it was saved by another version of the code")
    return load_weights(GPT(GPTConfig(**args)), checkpoint)


def trim_log(log_path, iter_num):
    """Keep the log lines from before the checkpoint at iter_num: an interrupted run may have logged
    further, and the resumed run will log those iterations again."""
    if not os.path.exists(log_path):
        return
    keep = []
    with open(log_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if rec['iter'] < iter_num or (rec['iter'] == iter_num and rec['kind'] == 'eval'):
                keep.append(line if line.endswith('\n') else line + '\n')
    with os_errors('rewrite', log_path):
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(keep)
        os.replace(log_path + '.tmp', log_path)


def training_checkpoint(model, optimizer, scaler, cfg, iter_num, best_val_loss, rngs, elapsed_s):
    """What ckpt.pt holds: enough to continue the run as if it had never stopped (restore_training).
    rngs: every rank's rng_states, in rank order (one without torchrun)."""
    return {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict() if scaler.is_enabled() else None,
            'model_args': asdict(model.config), 'config': dict(cfg), 'iter_num': iter_num,
            'best_val_loss': best_val_loss, 'rng': rngs[0], 'rng_ranks': rngs if len(rngs) > 1 else None,
            'elapsed_s': elapsed_s, 'format_version': FORMAT_VERSION}


def restore_training(checkpoint, model, optimizer, scaler, batch_generator, device, cfg, rank=0, world_size=1):
    """Put a run back as training_checkpoint saved it; returns (iter_num, best_val_loss, elapsed_s).
    The betas and weight decay are this run's (a resume may change them); the random streams come
    last, after the model was built (its initialization drew random numbers): each rank its own
    when the number of processes is the one saved, else rank 0's (the batches are the same, the
    dropout masks of other ranks are then new ones)."""
    load_weights(model, checkpoint)
    optimizer.load_state_dict(checkpoint['optimizer'])
    for group in optimizer.param_groups:  # the saved betas would otherwise win over this run's
        group['betas'] = (cfg.beta1, cfg.beta2)
    optimizer.param_groups[0]['weight_decay'] = cfg.weight_decay  # group 0: the matrices
    if checkpoint['scaler'] is not None and scaler.is_enabled():
        scaler.load_state_dict(checkpoint['scaler'])
    saved = checkpoint.get('rng_ranks') or [checkpoint['rng']]
    set_rng_states(saved[rank] if len(saved) == world_size else saved[0], batch_generator, device)
    if len(saved) != world_size and rank > 0:
        torch.manual_seed(cfg.seed + rank + checkpoint['iter_num'])
    return checkpoint['iter_num'], checkpoint['best_val_loss'], checkpoint.get('elapsed_s', 0.0)


# -----------------------------------------------------------------------------
# one run per out_dir

def lock_out_dir(out_dir):
    """Make out_dir this process's: a second run into it (two runs would interleave their logs and
    race for ckpt.pt) fails at once, naming the holder. An flock on out_dir/.lock, which the kernel
    releases when the process ends however it ends (kill -9 too), so no stale lock is ever left.
    Returns the open lock file: keep it for as long as the run writes into out_dir."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs there are not protected from each other
        return None
    path = os.path.join(out_dir, '.lock')
    with os_errors('create the lock file', path):
        f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise TrainError(f"{out_dir} is in use by another run ({holder}): wait for it to finish, or pass "
                         f"another --out_dir") from None
    with os_errors('write the lock file', path):
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
    return f


def set_aside_previous_run(out_dir):
    """A new run into an out_dir that holds one keeps it, one generation deep: log.jsonl and ckpt.pt
    become log.jsonl.prev and ckpt.pt.prev (replacing older .prev files). Returns what moved."""
    moved = []
    for name in ('ckpt.pt', 'log.jsonl'):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with os_errors('move aside', path):
                os.replace(path, path + '.prev')
            moved.append(name)
    return moved


# -----------------------------------------------------------------------------
# more than one process: torchrun --nproc_per_node=N train.py ... (DistributedDataParallel)

def init_distributed(device_name):
    """(rank, world_size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; plain python sets
    none, and this is one process, rank 0 of 1, on the device asked for. Under torchrun each process
    takes its own GPU (cuda:LOCAL_RANK, NCCL) or runs on the CPU (gloo)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type not in ('cuda', 'cpu'):
        raise ConfigError(f"device={device_name!r}: more than one process runs on CUDA GPUs (NCCL) or the "
                          f"CPU (gloo), not {device.type}")
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world_size, device


def mean_over_ranks(values, world_size, device):
    """The mean of these floats over every process, the same numbers on each (NCCL reduces on the GPU)."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size).tolist()


def gather_rng_states(states, world_size):
    """Every rank's random states, in rank order (a list of one without torchrun)."""
    if world_size == 1:
        return [states]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, states)
    return gathered
