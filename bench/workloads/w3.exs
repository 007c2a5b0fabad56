# W3: bulk ingest with Kuma.append_batch/3, 500 events per call. See docs/benchmarks.md.

defmodule Kuma.Bench.W3 do
  @moduledoc false
  alias Kuma.Bench.{Payload, Progress, Stores, Table, Writers}

  @target 500_000
  @per_call 500
  @entities_per_call 1

  def run(quick) do
    events = if quick, do: 500_000, else: 2_000_000
    writers = 32

    IO.puts(
      "W3: #{Progress.fmt(events)} events by append_batch, #{@per_call} events per call " <>
        "(#{@entities_per_call} entities x #{div(@per_call, @entities_per_call)}), #{writers} concurrent callers, " <>
        "10,000 entities, 16 shards, 200-byte payloads"
    )

    rows = for sync <- [:normal, :full], do: measure(sync, events, writers)
    for r <- rows, do: IO.puts("  sync=#{r.sync}: #{Progress.fmt(r.events_per_sec)} ev/s (#{r.seconds} s)")
    normal = Enum.find(rows, &(&1.sync == :normal))

    IO.puts(
      "target: >= #{Progress.fmt(@target)} ev/s (sync=normal): #{Table.verdict(normal.events_per_sec >= @target)}\n"
    )

    %{events: events, writers: writers, per_call: @per_call, rows: rows}
  end

  defp measure(sync, events, writers) do
    Stores.with_store([sync: sync], fn store ->
      per_entity = List.duplicate(Payload.event(200), div(@per_call, @entities_per_call))

      micros =
        Writers.run("W3 sync=#{sync}", writers, div(events, @per_call), @per_call, fn ->
          entries = for _ <- 1..@entities_per_call, do: {"user_#{:rand.uniform(10_000)}", per_entity}
          {:ok, _} = Kuma.append_batch(store, entries)
        end)

      %{sync: sync, seconds: Float.round(micros / 1_000_000, 2), events_per_sec: round(events * 1_000_000 / micros)}
    end)
  end
end
