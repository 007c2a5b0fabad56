# W8: scaling. W1 with 1 to 32 shards; W2 with 16 to 10,000 concurrent callers.
# See docs/benchmarks.md.

defmodule Kuma.Bench.W8 do
  @moduledoc false
  alias Kuma.Bench.{Progress, W1, W2}

  def run(quick) do
    events = if quick, do: 100_000, else: 500_000
    seconds = if quick, do: 3, else: 10

    IO.puts("W8: W1 (#{Progress.fmt(events)} events, sync=normal) by shard count; W2 (#{seconds} s) by callers")

    p = %{events: events, entities: 10_000, writers: 200, batch: 100, payload: 200, sync: :normal}

    shards =
      for n <- [1, 2, 4, 8, 16, 32] do
        r = W1.run_kuma(Map.put(p, :shards, n))
        IO.puts("  W1 with #{n} shards: #{Progress.fmt(r.events_per_sec)} ev/s")
        %{shards: n, events_per_sec: r.events_per_sec}
      end

    callers =
      for n <- [16, 200, 1_000, 10_000] do
        r = W2.measure(:normal, :execute, n, seconds, [])

        IO.puts(
          "  W2 with #{Progress.fmt(n)} callers: #{Progress.fmt(r.events_per_sec)} ev/s, p50 #{r.p50_us} us, p99 #{r.p99_us} us"
        )

        Map.put(r, :callers, n)
      end

    IO.puts("")
    %{w1_by_shards: shards, w2_by_callers: callers}
  end
end
