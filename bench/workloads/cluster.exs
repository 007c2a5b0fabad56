# CLUSTER: cluster mode on 3 local nodes (OTP :peer, one OS process each) beside
# single-node Kuma in the same run: W1 and W2 shapes with replicas: 3 and replicas: 1, and
# failover: the time from kill -9 of a shard's leader to the next acknowledged write to
# that shard. See docs/benchmarks.md ("Cluster").

defmodule Kuma.Bench.ClusterBench do
  @moduledoc false
  alias Kuma.Bench.{Payload, Progress, Table, W1, W2}

  @store :bench_cluster
  @w1_ratio 0.30
  @w2_ratio 0.30
  @failover_p99_ms 1_000

  def run(quick) do
    # The peer harness of the tests and the loads run on the nodes, loaded onto them.
    modules =
      Code.compile_file(Path.expand("../../test/support/cluster.ex", __DIR__)) ++
        Code.compile_file(Path.expand("../cluster/load.ex", __DIR__))

    p = W1.params(quick)
    seconds = if quick, do: 5, else: 20
    kills = if quick, do: 5, else: 20

    IO.puts(
      "CLUSTER: 3 nodes on this machine (one OS process each), #{p.shards} shards; W1: #{Progress.fmt(p.events)} events, " <>
        "#{p.writers} writers, appends of #{p.batch}; W2: 200 entities, #{seconds} s; failover: #{kills} kills"
    )

    single_w1 = W1.run_kuma(Map.put(p, :sync, :normal)).events_per_sec
    single_w2 = W2.measure(:normal, :execute, 200, seconds, []).events_per_sec
    IO.puts("  single node, same run: W1 #{Progress.fmt(single_w1)} ev/s, W2 execute #{Progress.fmt(single_w2)} ev/s")

    rows =
      for replicas <- [3, 1] do
        key = :crypto.strong_rand_bytes(32)

        opts = [
          shards: p.shards,
          master_key: key,
          aggregates: [Kuma.Bench.ClusterAccount],
          cluster: [replicas: replicas]
        ]

        {:ok, c} = Kuma.Test.Cluster.start(3, @store, opts, modules)

        try do
          w1 = w1(c, p)
          w2 = w2(c, seconds)
          failover = if replicas == 3, do: failover(c, kills), else: nil
          row = %{replicas: replicas, w1: w1, w2: w2, failover: failover}
          print(row, single_w1, single_w2)
          row
        after
          Kuma.Test.Cluster.stop(c)
        end
      end

    r3 = Enum.find(rows, &(&1.replicas == 3))

    IO.puts(
      "targets (replicas: 3): W1 >= #{round(@w1_ratio * 100)}% of single node: #{Table.verdict(r3.w1.events_per_sec >= @w1_ratio * single_w1)}; " <>
        "W2 >= #{round(@w2_ratio * 100)}%: #{Table.verdict(r3.w2.events_per_sec >= @w2_ratio * single_w2)}; " <>
        "failover p99 <= #{@failover_p99_ms} ms: #{Table.verdict(r3.failover.p99_ms <= @failover_p99_ms)}\n"
    )

    %{single: %{w1_events_per_sec: single_w1, w2_events_per_sec: single_w2}, rows: rows}
  end

  defp print(row, single_w1, single_w2) do
    IO.puts(
      "  replicas: #{row.replicas}: W1 #{Progress.fmt(row.w1.events_per_sec)} ev/s (#{pct(row.w1.events_per_sec, single_w1)} of single node), " <>
        "W2 #{Progress.fmt(row.w2.events_per_sec)} ev/s (#{pct(row.w2.events_per_sec, single_w2)}), p50 #{row.w2.p50_us} us p99 #{row.w2.p99_us} us"
    )

    if f = row.failover do
      IO.puts(
        "  failover after kill -9 of a leader: p50 #{f.p50_ms} ms, p99 #{f.p99_ms} ms, max #{f.max_ms} ms (#{f.kills} kills)"
      )
    end
  end

  defp pct(x, base), do: "#{round(x * 100 / max(base, 1))}%"

  # W1: the writers split over the three nodes, each node writing its share.
  defp w1(c, p) do
    names = Kuma.Test.Cluster.names(c)
    batch = List.duplicate(Payload.event(p.payload), p.batch)
    calls = div(p.events, p.batch)
    IO.puts("  W1 cluster: writing #{Progress.fmt(p.events)} events from #{length(names)} nodes ...")

    {micros, counts} =
      :timer.tc(fn ->
        names
        |> Enum.with_index()
        |> Enum.map(fn {name, i} ->
          writers = div(p.writers + length(names) - 1 - i, length(names))
          mine = div(calls + length(names) - 1 - i, length(names))
          args = [@store, writers, mine, batch, p.entities, i + 1]
          Task.async(fn -> Kuma.Test.Cluster.call(c, name, Kuma.Bench.ClusterLoad, :w1, args, :infinity) end)
        end)
        |> Task.await_many(:infinity)
      end)

    events = counts |> Enum.map(fn {_us, n} -> n end) |> Enum.sum()
    %{events: events, seconds: Float.round(micros / 1_000_000, 3), events_per_sec: round(events / (micros / 1_000_000))}
  end

  # W2: 200 entities, each driven by a process on one of the nodes (commands are routed to
  # the entity's shard leader).
  defp w2(c, seconds) do
    names = Kuma.Test.Cluster.names(c)
    event = Payload.event(200)
    IO.puts("  W2 cluster: 200 entities, #{seconds} s ...")

    results =
      names
      |> Enum.with_index()
      |> Enum.map(fn {name, i} ->
        ids = for n <- 1..200, rem(n, length(names)) == i, do: "w2:#{n}"

        Task.async(fn ->
          Kuma.Test.Cluster.call(c, name, Kuma.Bench.ClusterLoad, :w2, [@store, ids, event, seconds], :infinity)
        end)
      end)
      |> Task.await_many(:infinity)

    events = results |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    %{0.5 => p50, 0.99 => p99} = Kuma.Bench.Table.percentiles(Enum.flat_map(results, &elem(&1, 1)), [0.5, 0.99])
    %{events_per_sec: round(events / seconds), p50_us: p50, p99_us: p99}
  end

  # The node whose member leads `id`'s shard and serves it (asked of each node: a cached
  # route or a follower's idea of the leader may be out of date).
  defp leader(c, names, id) do
    case Enum.find(names, &Kuma.Test.Cluster.call(c, &1, Kuma.Bench.ClusterLoad, :leads?, [@store, id])) do
      nil -> Process.sleep(100) && leader(c, names, id)
      name -> name
    end
  end

  # kill -9 of the node that leads a probe entity's shard while another node appends to it
  # without pause: the time from the kill to the acknowledgement of the first append issued
  # after it. The node is started again (same data dir) before the next kill.
  defp failover(c, kills) do
    {c, times} =
      Enum.reduce(1..kills, {c, []}, fn k, {c, times} ->
        id = "failover-#{k}"
        names = Kuma.Test.Cluster.names(c)
        victim = leader(c, names, id)
        prober = hd(names -- [victim])
        pid = Kuma.Test.Cluster.call(c, prober, Kuma.Bench.ClusterLoad, :probe, [@store, id])
        Process.sleep(300)
        t0 = System.os_time(:millisecond)
        c = Kuma.Test.Cluster.kill9(c, victim)
        Process.sleep(2_500)
        acks = Kuma.Test.Cluster.call(c, prober, Kuma.Bench.ClusterLoad, :stop_probe, [pid])
        # The first append issued after the kill that was acknowledged: an ack that only
        # arrived after the kill for a write the old leader had committed does not count.
        took = Enum.find_value(acks, fn {issued, acked} -> if issued >= t0, do: acked - t0 end)
        {{:ok, _}, c} = Kuma.Test.Cluster.restart(c, victim)
        Process.sleep(500)
        IO.puts("  failover #{k}/#{kills}: #{took || "no write acknowledged within 2.5 s"} ms")
        {c, [took || 2_500 | times]}
      end)

    _ = c
    %{0.5 => p50, 0.99 => p99} = Kuma.Bench.Table.percentiles(times, [0.5, 0.99])
    %{kills: kills, p50_ms: p50, p99_ms: p99, max_ms: Enum.max(times), all_ms: Enum.reverse(times)}
  end
end
