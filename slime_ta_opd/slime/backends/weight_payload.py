"""The ``/update_weights_from_tensor`` payload: named tensors pickled with torch's multiprocessing reductions.

``serialize_named_tensors`` is SGLang's ``MultiprocessingSerializer`` form (base64 of a ``ForkingPickler`` dump);
``deserialize_named_tensors`` is its receiving side, and it is the only place where the embedded engine reads a
pickle that came over HTTP. A pickle is a program, so the payload is *checked as a program before any of it
runs* (``check_payload``):

* every opcode is on an allow-list: no extension codes (``EXT*``), no persistent ids, no ``INST``/``OBJ``/
  ``NEWOBJ``/``BUILD`` (which call classes or set attributes), no out-of-band buffers;
* every global (``GLOBAL`` or ``STACK_GLOBAL``) is an exact ``(module, name)`` pair of ``PAYLOAD_GLOBALS``.
  ``STACK_GLOBAL`` takes its names from the stack, so the check runs the pickle symbolically (stack and memo)
  to know them. Names never contain a dot: protocol 4 resolves ``a.b.c`` by walking attributes, which is how
  ``rebuild_tensor.__builtins__`` reached ``eval``;
* every call (``REDUCE``) calls one of ``PAYLOAD_CALLABLES``, torch's tensor and storage rebuild functions and
  ``torch.Size``; a value made by a call is never called.

Only then is it unpickled, by an unpickler whose ``find_class`` accepts the same exact pairs (a second line).
"""

from __future__ import annotations

import base64
import io
import pickle
import pickletools
from typing import Any

import torch

_REDUCTIONS = "torch.multiprocessing.reductions"
# What a call may call: how torch's reductions rebuild a tensor (CPU shared memory by file name, or CUDA IPC) and
# SGLang's UUID-aware CUDA rebuild (what a sender with SGLang installed pickles). Not rebuild_storage_fd: it needs
# a connection object to the sender, which a payload cannot carry.
PAYLOAD_CALLABLES: frozenset[tuple[str, str]] = frozenset(
    {
        (_REDUCTIONS, "rebuild_tensor"),
        (_REDUCTIONS, "rebuild_cuda_tensor"),
        (_REDUCTIONS, "rebuild_storage_filename"),
        (_REDUCTIONS, "rebuild_storage_empty"),
        (_REDUCTIONS, "rebuild_typed_storage"),
        (_REDUCTIONS, "rebuild_typed_storage_child"),
        ("sglang.srt.patch_torch", "_rebuild_cuda_tensor_modified"),
        ("torch", "Size"),
    }
)
# What a payload may name as a value (passed to the calls above, never called): tensor, parameter and storage
# classes and torch's dtypes.
PAYLOAD_VALUES: frozenset[tuple[str, str]] = frozenset(
    {("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch.storage", "UntypedStorage")}
    | {("torch.storage", "TypedStorage")}
    | {("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
)
PAYLOAD_GLOBALS = PAYLOAD_CALLABLES | PAYLOAD_VALUES

# Opcodes a tensor payload is made of (plus harmless containers and scalars). Everything else is refused.
_ALLOWED_OPCODES = frozenset(
    """PROTO FRAME STOP MARK POP POP_MARK DUP
    NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT
    STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8
    BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8
    EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_DICT DICT SETITEM SETITEMS
    EMPTY_SET ADDITEMS FROZENSET
    PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET LONG_BINGET
    GLOBAL STACK_GLOBAL REDUCE""".split()
)
_STRING_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})


class _Mark:
    pass


class _Str(str):
    """A string the symbolic run knows (the operand of a later ``STACK_GLOBAL``)."""


class _Global(tuple):
    """A global the symbolic run resolved: ``(module, name)``."""


_MARK = _Mark()
_VALUE = object()  # anything else: a container, a number, the result of a call


def _refuse(pos: int, what: str) -> ValueError:
    return ValueError(f"weight payload refused before unpickling (opcode at byte {pos}): {what}")


def _check_global(module: Any, name: Any, pos: int) -> _Global:
    if not isinstance(module, str) or not isinstance(name, str):
        raise _refuse(pos, "STACK_GLOBAL with operands that are not literal strings")
    if (module, name) not in PAYLOAD_GLOBALS:
        raise _refuse(
            pos, f"{module}.{name} is not allowed in a weight payload (only torch's tensor rebuild functions, "
            "tensor/storage classes and dtypes may appear; dotted names and attribute lookups never do)"
        )  # fmt: skip
    return _Global((module, name))


def check_payload(raw: bytes) -> None:
    """Refuse (``ValueError``) a pickle that is anything but a tensor payload, without running any of it."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop() -> Any:
        if not stack or stack[-1] is _MARK:
            raise _refuse(pos, f"{name} on an empty stack (malformed pickle)")
        return stack.pop()

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise _refuse(pos, f"{name} without a MARK (malformed pickle)")

    try:
        ops = list(pickletools.genops(raw))
    except Exception as e:
        raise ValueError(f"weight payload is not a well-formed pickle: {e}") from e
    stopped = False
    for op, arg, pos in ops:
        name = op.name
        if name not in _ALLOWED_OPCODES:
            raise _refuse(pos, f"opcode {name} is not allowed in a weight payload")
        if name in _STRING_OPCODES:
            stack.append(_Str(arg))
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            stack.append(_check_global(module, attr, pos))
        elif name == "STACK_GLOBAL":
            attr, module = pop(), pop()
            stack.append(_check_global(module, attr, pos))
        elif name == "REDUCE":
            pop()  # the arguments
            fn = pop()
            if not isinstance(fn, _Global) or tuple(fn) not in PAYLOAD_CALLABLES:
                shown = ".".join(fn) if isinstance(fn, _Global) else "a value that is not an allowed function"
                raise _refuse(pos, f"REDUCE calls {shown}: only torch's tensor rebuild functions may be called")
            stack.append(_VALUE)
        elif name == "MARK":
            stack.append(_MARK)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            top = pop()  # refuses a MARK: the real unpickler would memoize what lies below it
            stack.append(top)
            memo[len(memo) if name == "MEMOIZE" else int(arg)] = top
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if int(arg) not in memo:
                raise _refuse(pos, f"{name} {arg} reads a memo slot never written (malformed pickle)")
            stack.append(memo[int(arg)])
        elif name == "DUP":
            top = pop()
            stack += [top, top]
        elif name == "STOP":
            stopped = True
            break
        elif name in ("PROTO", "FRAME"):
            continue
        else:  # containers and scalars: pop what the opcode takes, push opaque values
            before = op.stack_before
            if pickletools.markobject in before:
                pop_mark()
                for _ in range(before.index(pickletools.markobject)):
                    pop()
            else:
                for _ in before:
                    pop()
            stack.extend(_VALUE for _ in op.stack_after)
    if not stopped:
        raise ValueError("weight payload is truncated: no STOP opcode")


class _PayloadUnpickler(pickle.Unpickler):
    """The second line behind ``check_payload``: exact ``(module, name)`` pairs, no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PAYLOAD_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weight payload")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a weight payload")


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """``named`` pickled with torch's multiprocessing reductions, base64 (SGLang's ``MultiprocessingSerializer``
    with ``output_str=True``). CPU tensors must already be in shared memory (``share_memory_``)."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_payload(payload: str | bytes) -> bytes:
    """The pickle bytes of a payload, checked by ``check_payload`` (``ValueError`` naming the problem)."""
    try:
        raw = base64.b64decode(payload, validate=True) if isinstance(payload, str) else bytes(payload)
    except Exception as e:
        raise ValueError(f"weight payload could not be read: not base64 ({e})") from e
    check_payload(raw)
    return raw


def deserialize_named_tensors(payload: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """The receiving side of ``serialize_named_tensors``: a list of ``(name, tensor)``, refused with a
    ``ValueError`` naming the problem when the payload is malformed or names anything but torch's tensor types."""
    import torch.multiprocessing.reductions  # noqa: F401 (registers the rebuild functions)

    raw = decode_payload(payload)
    try:
        named = _PayloadUnpickler(io.BytesIO(raw)).load()
    except Exception as e:
        raise ValueError(f"weight payload could not be read: {e}") from e
    if not isinstance(named, list) or not all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)
        for item in named
    ):
        raise ValueError("weight payload must be a list of (name, tensor) pairs")
    return named
