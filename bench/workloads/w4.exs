# W4: reads of live entities (served from the store's ETS table): latency of single reads
# and throughput with 8 concurrent readers. See docs/benchmarks.md.

defmodule Kuma.Bench.W4 do
  @moduledoc false
  alias Kuma.Bench.{Progress, Stores, Table}

  @targets %{p50_us: 2, p99_us: 20, reads_per_sec: 500_000}

  def run(quick) do
    entities = 10_000
    samples = if quick, do: 200_000, else: 1_000_000
    seconds = if quick, do: 3, else: 10

    IO.puts(
      "W4: #{Progress.fmt(entities)} live entities; #{Progress.fmt(samples)} timed reads, then 8 readers for #{seconds} s"
    )

    Stores.with_store([], fn store ->
      handles =
        for i <- 1..entities do
          e = Kuma.entity(store, Kuma.Bench.Account, "w4:#{i}")
          {:ok, _} = Kuma.execute(e, {:deposit, {:deposited, i}})
          e
        end
        |> List.to_tuple()

      latency = latency(handles, samples)
      throughput = throughput(handles, 8, seconds)

      IO.puts(
        "  read latency: p50 #{latency.p50_ns} ns, p99 #{latency.p99_ns} ns, p999 #{latency.p999_ns} ns; " <>
          "8 readers: #{Progress.fmt(throughput)} reads/s"
      )

      IO.puts(
        "targets: p50 <= #{@targets.p50_us} us: #{Table.verdict(latency.p50_ns <= @targets.p50_us * 1000)}; " <>
          "p99 <= #{@targets.p99_us} us: #{Table.verdict(latency.p99_ns <= @targets.p99_us * 1000)}; " <>
          ">= #{Progress.fmt(@targets.reads_per_sec)} reads/s: #{Table.verdict(throughput >= @targets.reads_per_sec)}\n"
      )

      Map.merge(latency, %{reads_per_sec_8_readers: throughput, entities: entities})
    end)
  end

  defp latency(handles, samples) do
    n = tuple_size(handles)

    times =
      for i <- 1..samples do
        e = elem(handles, rem(i * 7919, n))
        t0 = System.monotonic_time(:nanosecond)
        _ = Kuma.read(e)
        System.monotonic_time(:nanosecond) - t0
      end

    pct = Table.percentiles(times, [0.5, 0.99, 0.999])
    %{p50_ns: pct[0.5], p99_ns: pct[0.99], p999_ns: pct[0.999]}
  end

  defp throughput(handles, readers, seconds) do
    n = tuple_size(handles)
    deadline = System.monotonic_time(:millisecond) + seconds * 1000

    1..readers
    |> Enum.map(fn r -> Task.async(fn -> read_loop(handles, n, r, deadline, 0) end) end)
    |> Task.await_many(:infinity)
    |> Enum.sum()
    |> div(seconds)
  end

  # Checks the clock every 1,000 reads.
  defp read_loop(handles, n, r, deadline, count) do
    for i <- 1..1000, do: Kuma.read(elem(handles, rem((count + i) * 31 + r, n)))

    if System.monotonic_time(:millisecond) >= deadline,
      do: count + 1000,
      else: read_loop(handles, n, r, deadline, count + 1000)
  end
end
