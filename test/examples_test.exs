defmodule Kuma.ExamplesTest do
  # The examples are programs users run (`bin/demo` runs examples/demo.exs): run them as a
  # user would, in their own VM, so they cannot silently stop working.
  use ExUnit.Case, async: true

  @moduletag timeout: 180_000
  @root Path.expand("..", __DIR__)

  # A data dir of its own for one test, removed afterwards.
  defp tmp_dir(prefix) do
    dir = Path.join(System.tmp_dir!(), "#{prefix}_#{System.pid()}_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)
    dir
  end

  # Runs `cmd args` in the repository as a user would (MIX_ENV=test): its output, which
  # must end with exit status 0.
  defp run!(cmd, args, env \\ []) do
    {out, status} = System.cmd(cmd, args, cd: @root, stderr_to_stdout: true, env: [{"MIX_ENV", "test"} | env])
    assert status == 0, out
    out
  end

  test "examples/demo.exs runs twice on one data dir, continuing its streams" do
    dir = tmp_dir("kuma_demo")

    first = run_demo(dir)
    assert first =~ "appended 3 events to alice"
    assert first =~ "A stale write is refused and changes nothing"
    assert first =~ "erased customer-"
    assert first =~ ~r/Whole store verified: \d+ events/

    second = run_demo(dir)
    assert second =~ "appended 2 events to alice", "the second run continues alice's stream"
  end

  test "examples/bank/transfers.exs runs its transfers concurrently and keeps the total" do
    out = run!("mix", ["run", "examples/bank/transfers.exs", "--data-dir", tmp_dir("kuma_bank"), "--transfers", "100"])
    assert out =~ ~r/100 transfers in \d+ ms: %\{.*completed: \d+/
    assert out =~ "(unchanged)"
    assert out =~ "saga_ended"
  end

  test "iex -S mix opens with the banner and the helpers work on the demo store" do
    dir = tmp_dir("kuma_iex")
    input = tmp_dir("kuma_iex_input")

    File.write!(
      input,
      ~s[append("alice", {:deposited, 50})\nhistory("alice")\nchain("alice")\nstate("alice")\ninfo().shards\n]
    )

    out = run!("sh", ["-c", "iex -S mix < \"$0\"", input], [{"KUMA_DATA_DIR", dir}])

    assert out =~
             ~r/Kuma \d+\.\d+\.\d+ · store :demo on .* \(16 shards, encrypted\) · monitor http:\/\/127\.0\.0\.1:\d+\//

    assert out =~ "Helpers: append(id, event), state(id), history(id), chain(id), info()"
    assert out =~ "{:ok, 1}"
    assert out =~ ~r/ 1  deposited  \{:deposited, 50\}  \d{4}-/
    assert out =~ "verified: 1 events"
    assert out =~ "kuma(4)> {:deposited, 50}"
    assert out =~ "kuma(5)> 16"
  end

  @tag :gleam
  test "examples/gleam_bank runs its Gleam aggregate and saga against a real store" do
    out = run!("mix", ["run", "examples/gleam_bank/run.exs", "--data-dir", tmp_dir("kuma_gleam_bank")])
    assert out =~ "1 transfers completed, 2 compensated; total of all balances 100"
  end

  defp run_demo(dir), do: run!("mix", ["run", "examples/demo.exs", "--data-dir", dir, "--shards", "4"])
end
