defmodule Kuma.ExamplesTest do
  # The examples are programs users run (`bin/demo` runs examples/demo.exs): run them as a
  # user would, in their own VM, so they cannot silently stop working.
  use ExUnit.Case, async: true

  @moduletag timeout: 180_000
  @root Path.expand("..", __DIR__)

  test "examples/demo.exs runs twice on one data dir, continuing its streams" do
    dir = Path.join(System.tmp_dir!(), "kuma_demo_#{System.pid()}_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)

    first = run_demo(dir)
    assert first =~ "appended 3 events to alice"
    assert first =~ "A stale write is refused and changes nothing"
    assert first =~ "erased customer-"
    assert first =~ ~r/Whole store verified: \d+ events/

    second = run_demo(dir)
    assert second =~ "appended 2 events to alice", "the second run continues alice's stream"
  end

  test "examples/bank/transfers.exs runs its transfers concurrently and keeps the total" do
    dir = Path.join(System.tmp_dir!(), "kuma_bank_#{System.pid()}_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)

    {out, status} =
      System.cmd("mix", ["run", "examples/bank/transfers.exs", "--data-dir", dir, "--transfers", "100"],
        cd: @root,
        stderr_to_stdout: true,
        env: [{"MIX_ENV", "test"}]
      )

    assert status == 0, out
    assert out =~ ~r/100 transfers in \d+ ms: %\{.*completed: \d+/
    assert out =~ "(unchanged)"
    assert out =~ "saga_ended"
  end

  defp run_demo(dir) do
    {out, status} =
      System.cmd("mix", ["run", "examples/demo.exs", "--data-dir", dir, "--shards", "4"],
        cd: @root,
        stderr_to_stdout: true,
        env: [{"MIX_ENV", "test"}]
      )

    assert status == 0, out
    out
  end
end
