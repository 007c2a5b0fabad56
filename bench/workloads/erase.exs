# ERASE: Kuma.delete/2 of an entity with 10,000 events, and what it does to other writers
# of the same shard meanwhile. See docs/benchmarks.md.

defmodule Kuma.Bench.Erase do
  @moduledoc false

  alias Kuma.Bench.{Payload, Progress, Stores, Table}

  @events_per_victim 10_000
  @target_ms 50

  def run(quick) do
    victims = if quick, do: 5, else: 15
    shards = 4

    IO.puts(
      "ERASE: #{victims} entities of #{Progress.fmt(@events_per_victim)} events (200 B) deleted one by one, " <>
        "#{shards} shards, while 4 writers append single events to other entities of the same shard"
    )

    Stores.with_store([shards: shards], fn store ->
      event = Payload.event(200)
      {:ok, shard} = Kuma.shard_for(store, "victim-1")
      # Victims and bystanders all live in the victim's shard: the worst case for stalls.
      ids = same_shard(store, shard, "victim-", victims)
      bystanders = same_shard(store, shard, "bystander-", 64)

      IO.puts(" writing #{Progress.fmt(victims * @events_per_victim)} events ...")

      for id <- ids, chunk <- Enum.chunk_every(1..@events_per_victim, 1000) do
        {:ok, _} = Kuma.append(store, id, List.duplicate(event, length(chunk)))
      end

      :ok = Kuma.flush(store)
      {stop, writers} = start_writers(store, bystanders, event)
      # Let the writers settle before the first delete.
      Process.sleep(500)

      # A delete answers once the entity is unreadable (tombstone durable, key destroyed);
      # its events are then deleted in chunks between the writers' appends: `purged` is
      # the time from the call until `erasure_status` says complete.
      timings =
        for {id, i} <- Enum.with_index(ids, 1) do
          t0 = System.monotonic_time(:microsecond)
          {:ok, %{events_deleted: @events_per_victim}} = Kuma.delete(store, id)
          answered = System.monotonic_time(:microsecond) - t0
          purged = wait_complete(store, id, t0)
          if rem(i, 5) == 0, do: IO.puts("  #{i}/#{victims} deleted")
          Process.sleep(100)
          {answered, purged}
        end

      {deletes, purges} = Enum.unzip(timings)

      :atomics.put(stop, 1, 1)
      latencies = writers |> Task.await_many(60_000) |> List.flatten()

      d = Table.percentiles(deletes, [0.5, 0.99])
      w = Table.percentiles(latencies, [0.5, 0.99, 0.999])
      worst = Enum.max(latencies)
      ms = &Float.round(&1 / 1000, 1)

      IO.puts("\nERASE results (ms)")

      IO.puts(
        "  delete of #{Progress.fmt(@events_per_victim)} events: p50 #{ms.(d[0.5])}, p99/max #{ms.(Enum.max(deletes))}"
      )

      p = Table.percentiles(purges, [0.5])

      IO.puts(
        "  events deleted from the file (erasure_status complete) after: p50 #{ms.(p[0.5])}, max #{ms.(Enum.max(purges))}"
      )

      IO.puts(
        "  same-shard appends during the run (#{Progress.fmt(length(latencies))}): p50 #{ms.(w[0.5])}, " <>
          "p99 #{ms.(w[0.99])}, p99.9 #{ms.(w[0.999])}, max #{ms.(worst)}"
      )

      IO.puts(
        "targets: delete p50 <= #{@target_ms} ms: #{Table.verdict(d[0.5] <= @target_ms * 1000)}; " <>
          "no same-shard append waits longer than #{@target_ms} ms: #{Table.verdict(worst <= @target_ms * 1000)}\n"
      )

      %{
        victims: victims,
        events_per_victim: @events_per_victim,
        delete_ms: %{p50: ms.(d[0.5]), p99: ms.(d[0.99]), max: ms.(Enum.max(deletes))},
        purged_ms: %{p50: ms.(p[0.5]), max: ms.(Enum.max(purges))},
        append_ms: %{p50: ms.(w[0.5]), p99: ms.(w[0.99]), p999: ms.(w[0.999]), max: ms.(worst)},
        appends: length(latencies)
      }
    end)
  end

  defp wait_complete(store, id, t0) do
    case Kuma.erasure_status(store, id) do
      {:ok, %{complete: true}} ->
        System.monotonic_time(:microsecond) - t0

      _ ->
        Process.sleep(1)
        wait_complete(store, id, t0)
    end
  end

  defp same_shard(store, shard, prefix, n) do
    Stream.iterate(1, &(&1 + 1))
    |> Stream.map(&"#{prefix}#{&1}")
    |> Stream.filter(fn id -> Kuma.shard_for(store, id) == {:ok, shard} end)
    |> Enum.take(n)
  end

  # 4 writers append one event at a time to bystanders, each recording its latencies (µs).
  defp start_writers(store, bystanders, event) do
    stop = :atomics.new(1, [])

    tasks =
      for w <- 1..4 do
        Task.async(fn ->
          mine = Enum.drop(bystanders, w - 1) |> Enum.take_every(4)
          write_loop(store, mine, event, stop, [])
        end)
      end

    {stop, tasks}
  end

  defp write_loop(store, ids, event, stop, acc) do
    if :atomics.get(stop, 1) == 1 do
      acc
    else
      id = Enum.random(ids)
      {micros, {:ok, _}} = :timer.tc(fn -> Kuma.append(store, id, event) end)
      write_loop(store, ids, event, stop, [micros | acc])
    end
  end
end
