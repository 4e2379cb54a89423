"""Sizes as every face takes them: ``4096``, ``512K``, ``64M``, ``1G``, ``1GiB`` (powers of
1024). The command line's ``--size`` and the API's ``size`` (an integer of bytes, or a
string with a unit) both read them here."""

from __future__ import annotations

from .errors import InvalidArgument


def parse_size(text: str | int) -> int:
    """Bytes of ``text`` (``4096``, ``512K``, ``64M``, ``1G``, ``1GiB``; an int is bytes).
    InvalidArgument when it is not a positive size."""
    if isinstance(text, bool):
        raise InvalidArgument(f"invalid size {text!r}", op="parse size", obj=repr(text),
                              hint="a number of bytes, or with a suffix K, M, G or T")
    if isinstance(text, int):
        n = text
    else:
        t = text.strip().upper().removesuffix("IB").removesuffix("B")
        mult = 1
        for i, suf in enumerate("KMGT", start=1):
            if t.endswith(suf):
                mult, t = 1024 ** i, t[:-1]
                break
        try:
            n = int(t) * mult
        except ValueError:
            raise InvalidArgument(f"invalid size {text!r}", op="parse size", obj=text,
                                  hint="a number of bytes, or with a suffix K, M, G or T") from None
    if n <= 0:
        raise InvalidArgument(f"invalid size {text!r}: must be positive", op="parse size", obj=str(text))
    return n


__all__ = ["parse_size"]
