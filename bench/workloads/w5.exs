# W5: cold loads of entities with 1,000 events each, with snapshots every 100 events and
# without snapshots: time from a read of a passivated entity to its state.

defmodule Kuma.Bench.W5 do
  @moduledoc false
  alias Kuma.Bench.{Payload, Progress, Stores, Table}

  @target_us 1000

  def run(quick) do
    entities = if quick, do: 50, else: 200
    IO.puts("W5: #{entities} entities x 1,000 events of 200 bytes, written through the entities")

    # 1,000 events end on a snapshot (the best case); 1,099 replay 99 events (the worst).
    rows =
      for {snapshot_every, events} <- [{100, 1000}, {100, 1099}, {nil, 1000}] do
        r = measure(entities, snapshot_every, events)

        IO.puts(
          "  #{events} events, snapshot_every=#{inspect(snapshot_every)}: cold load p50 #{r.p50_us} us, " <>
            "p99 #{r.p99_us} us, replayed #{r.replayed} events per load"
        )

        r
      end

    [best, worst, _] = rows

    IO.puts(
      "target: p50 <= #{@target_us} us with snapshots: #{Table.verdict(best.p50_us <= @target_us)} " <>
        "(0 replayed), #{Table.verdict(worst.p50_us <= @target_us)} (99 replayed)\n"
    )

    %{rows: rows}
  end

  defp measure(entities, snapshot_every, events) do
    Stores.with_store([snapshot_every: snapshot_every], fn store ->
      event = Payload.event(200)
      handles = for i <- 1..entities, do: Kuma.entity(store, Kuma.Bench.Account, "w5:#{i}")
      counter = :counters.new(1, [])
      progress = Progress.start("W5 writing (snapshot_every=#{inspect(snapshot_every)})", entities * events, counter)

      handles
      |> Task.async_stream(
        fn e ->
          for _ <- 1..events do
            {:ok, _} = Kuma.execute(e, {:deposit, event})
            :counters.add(counter, 1, 1)
          end
        end,
        max_concurrency: 64,
        timeout: :infinity
      )
      |> Stream.run()

      Progress.stop(progress)
      :ok = Kuma.flush(store)
      Enum.each(handles, &Kuma.passivate/1)

      times =
        for e <- handles do
          t0 = System.monotonic_time(:microsecond)
          ^events = Kuma.read(e)
          System.monotonic_time(:microsecond) - t0
        end

      {:ok, %{replayed_on_load: replayed}} = Kuma.entity_info(hd(handles))
      pct = Table.percentiles(times, [0.5, 0.99])
      %{snapshot_every: snapshot_every, events: events, p50_us: pct[0.5], p99_us: pct[0.99], replayed: replayed}
    end)
  end
end
