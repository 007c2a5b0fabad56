# SUBS: single-event appends while many per-entity subscriptions wait for other entities
# (what a framework does: one subscription per live aggregate): 0, 100 and 1,000 idle
# subscriptions. A subscription to one entity is told only of the commits that wrote its
# entity (Kuma.Feed), so idle ones should cost nothing; the rows with the live tail off
# (`tail_bytes: 0`) show the same with every read going to the file. See
# docs/benchmarks.md.

defmodule Kuma.Bench.Subs do
  @moduledoc false
  alias Kuma.Bench.{Payload, Progress, Stores}

  @writers 200

  def run(quick) do
    seconds = if quick, do: 3, else: 5
    counts = [0, 100, 1_000]

    IO.puts(
      "SUBS: #{@writers} writers append one 200-byte event per call for #{seconds} s, 16 shards, with " <>
        "#{Enum.join(counts, " / ")} idle per-entity subscriptions; live tail on (default) and off"
    )

    rows =
      for tail <- [:on, :off], subs <- counts do
        opts = if tail == :off, do: [tail_bytes: 0], else: []

        rate =
          Stores.with_store(opts, fn store ->
            for i <- 1..subs//1, do: {:ok, _} = Kuma.subscribe(store, entity_id: "idle-#{i}")
            appends(store, seconds)
          end)

        IO.puts("  tail #{tail}, #{subs} subscriptions: #{Progress.fmt(rate)} appends/s")
        %{tail: tail, subscriptions: subs, appends_per_s: rate}
      end

    at = fn tail, subs -> Enum.find(rows, &(&1.tail == tail and &1.subscriptions == subs)).appends_per_s end

    IO.puts("\nSUBS results (appends/s; share of the same run without subscriptions)")

    for subs <- counts do
      on = at.(:on, subs)
      off = at.(:off, subs)

      IO.puts(
        "  #{String.pad_leading(Integer.to_string(subs), 4)} subscriptions: tail on #{Progress.fmt(on)} " <>
          "(#{share(on, at.(:on, 0))}), tail off #{Progress.fmt(off)} (#{share(off, at.(:off, 0))})"
      )
    end

    IO.puts("")
    %{rows: rows, seconds: seconds}
  end

  defp share(rate, base), do: "#{round(rate * 100 / max(base, 1))}%"

  defp appends(store, seconds) do
    event = Payload.event(200)
    stop = System.monotonic_time(:millisecond) + seconds * 1_000

    1..@writers
    |> Enum.map(fn w ->
      Task.async(fn -> loop(store, "w-#{w}", event, stop, 0) end)
    end)
    |> Task.await_many(seconds * 1_000 + 60_000)
    |> Enum.sum()
    |> div(seconds)
  end

  defp loop(store, id, event, stop, n) do
    if System.monotonic_time(:millisecond) >= stop do
      n
    else
      {:ok, _} = Kuma.append(store, id, event)
      loop(store, id, event, stop, n + 1)
    end
  end
end
