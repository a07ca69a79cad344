"""mypy checks user code against sagakit's generic handler and saga types."""

from __future__ import annotations

from pathlib import Path

from mypy import api

USER_CODE = """
import msgspec
import sagakit as sk

@sk.command("t.Reserve")
class Reserve(msgspec.Struct):
    n: int

@sk.command("t.Cancel")
class Cancel(msgspec.Struct):
    n: int

class Order(msgspec.Struct):
    n: int

app = sk.App("memory://")
stock = app.participant("stock")

@stock.command(Reserve)
async def right(cmd: Reserve, ctx: sk.Context) -> None: ...

@stock.command(Reserve)  # expect an error: the handler takes another command
async def wrong(cmd: Cancel, ctx: sk.Context) -> None: ...

saga = sk.Saga("s", Order).step("a").invoke("stock", lambda d: Reserve(d.n)).build()

async def go() -> None:
    await app.sagas.start(saga, Order(1))
    await app.sagas.start(saga, Reserve(1))  # expect an error
"""


def test_mypy_rejects_a_handler_or_saga_data_of_the_wrong_type(tmp_path: Path) -> None:
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    out, _, status = api.run(
        [str(user), "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache")]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1
    marked = [str(n) for n, line in enumerate(USER_CODE.splitlines(), 1) if "expect an" in line]
    assert [line.split(":")[1] for line in errors] == marked, out
