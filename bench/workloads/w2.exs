# W2: single-event writes through entity processes. 200 callers, each with its own entity,
# loop Kuma.execute/3 (decide + append + evolve) for the duration; the same with plain
# Kuma.append/3 through the entity; and 200 callers sharing 10 entities (20 each: hot
# entities, whose waiting writes are pipelined). See docs/benchmarks.md.

defmodule Kuma.Bench.W2 do
  @moduledoc false
  alias Kuma.Bench.{Payload, Progress, Stores, Table}

  @target 100_000

  def run(quick) do
    seconds = if quick, do: 5, else: 30
    callers = 200

    IO.puts(
      "W2: #{callers} concurrent entities, one 200-byte event per call, #{seconds} s per row, 16 shards unless stated"
    )

    rows =
      for {sync, op, store_opts, entities} <- rows(quick) do
        r = measure(sync, op, callers, seconds, store_opts, entities)
        hot = if entities < callers, do: [entities: entities], else: []
        label = Enum.map_join([sync: sync] ++ store_opts ++ hot, " ", fn {k, v} -> "#{k}=#{v}" end) <> " #{op}"

        IO.puts(
          "  #{label}: #{Progress.fmt(r.events_per_sec)} ev/s, call latency p50 #{r.p50_us} us p99 #{r.p99_us} us"
        )

        r
      end

    best =
      Enum.find(rows, &(&1.sync == :normal and &1.op == :execute and &1.store_opts == %{} and &1.entities == callers))

    IO.puts(
      "target: >= #{Progress.fmt(@target)} ev/s (execute, sync=normal): #{Table.verdict(best.events_per_sec >= @target)}\n"
    )

    %{callers: callers, seconds: seconds, rows: rows}
  end

  # {sync, operation, store options beyond the defaults (16 shards, a writer thread each),
  # entities the callers share (200: one each)}
  defp rows(true),
    do: [
      {:normal, :execute, [], 200},
      {:normal, :append, [], 200},
      {:full, :execute, [], 200},
      {:normal, :execute, [], 10}
    ]

  defp rows(false),
    do: rows(true) ++ [{:normal, :execute, [writer_threads: 2], 200}, {:normal, :execute, [shards: 4], 200}]

  def measure(sync, op, callers, seconds, store_opts, entities \\ nil) do
    entities = entities || callers

    Stores.with_store([sync: sync] ++ store_opts, fn store ->
      event = Payload.event(200)
      counter = :counters.new(1, [:write_concurrency])
      progress = Progress.start("W2 sync=#{sync} #{op}", {:seconds, seconds}, counter)
      deadline = System.monotonic_time(:millisecond) + seconds * 1000

      latencies =
        1..callers
        |> Enum.map(fn c ->
          entity = Kuma.entity(store, Kuma.Bench.Account, "w2:#{rem(c, entities)}")
          # Activate first so the timed loop measures writes, not loads.
          Kuma.read(entity)

          Task.async(fn ->
            loop(entity, op, event, deadline, counter, [])
          end)
        end)
        |> Task.await_many(:infinity)
        |> List.flatten()

      Progress.stop(progress)
      total = :counters.get(counter, 1)
      pct = Table.percentiles(latencies, [0.5, 0.99])

      %{
        sync: sync,
        op: op,
        store_opts: Map.new(store_opts),
        entities: entities,
        events: total,
        events_per_sec: round(total / seconds),
        p50_us: pct[0.5],
        p99_us: pct[0.99]
      }
    end)
  end

  # Samples every 16th call's latency to keep the measurement light.
  defp loop(entity, op, event, deadline, counter, lat, i \\ 0) do
    if System.monotonic_time(:millisecond) >= deadline do
      lat
    else
      t0 = System.monotonic_time(:microsecond)

      {:ok, _} =
        case op do
          :execute -> Kuma.execute(entity, {:deposit, event})
          :append -> Kuma.append(entity, event)
        end

      :counters.add(counter, 1, 1)
      lat = if rem(i, 16) == 0, do: [System.monotonic_time(:microsecond) - t0 | lat], else: lat
      loop(entity, op, event, deadline, counter, lat, i + 1)
    end
  end
end
