# MEM: memory per idle live entity, measured around activating 100,000 entities (each with
# one event) and letting them hibernate.

defmodule Kuma.Bench.Memory do
  @moduledoc false
  alias Kuma.Bench.{Progress, Stores, Table}

  @target_bytes 4096

  def run(quick) do
    n = if quick, do: 20_000, else: 100_000
    IO.puts("MEM: activate #{Progress.fmt(n)} entities with one event each, wait for hibernation")

    Stores.with_store([max_live_entities: n * 2], fn store ->
      ids = for i <- 1..n, do: "mem:#{i}"

      ids
      |> Enum.chunk_every(1000)
      |> Enum.each(fn chunk -> {:ok, _} = Kuma.append_batch(store, Enum.map(chunk, &{&1, {:reading, 1}})) end)

      :erlang.garbage_collect()
      Process.sleep(500)
      before = :erlang.memory()
      counter = :counters.new(1, [])
      progress = Progress.start("MEM activating", n, counter)

      ids
      |> Task.async_stream(
        fn id ->
          {:ok, _} = Kuma.fetch(Kuma.entity(store, Kuma.Bench.Account, id))
          :counters.add(counter, 1, 1)
        end,
        max_concurrency: 16,
        ordered: false
      )
      |> Stream.run()

      Progress.stop(progress)
      # Entities hibernate after 2 s without messages.
      Process.sleep(3_000)
      :erlang.garbage_collect()
      after_ = :erlang.memory()
      per = fn key -> div(after_[key] - before[key], n) end
      total = per.(:total)

      IO.puts(
        "  per idle live entity: #{total} bytes total (processes #{per.(:processes)}, ets #{per.(:ets)}, " <>
          "binary #{per.(:binary)})"
      )

      IO.puts("target: <= #{@target_bytes} bytes: #{Table.verdict(total <= @target_bytes)}\n")
      %{entities: n, bytes_per_entity: total, processes: per.(:processes), ets: per.(:ets)}
    end)
  end
end
