# CLUSTER: cluster mode on 3 local nodes (OTP :peer, one OS process each) beside
# single-node Kuma in the same run: W1 and W2 shapes with replicas: 3 and replicas: 1, and
# failover: the time from kill -9 of a shard's leader to the next acknowledged write to
# that shard. See docs/benchmarks.md ("Cluster").

defmodule Kuma.Bench.ClusterBench do
  @moduledoc false
  alias Kuma.Bench.{Payload, Progress, Table, W1, W2}
  # The peer harness of the tests is compiled when this workload runs (below), not before.
  @compile {:no_warn_undefined, [Kuma.Test.Cluster, Kuma.Bench.ClusterLoad]}

  @store :bench_cluster
  @w1_ratio 0.30
  @w2_ratio 0.30
  @failover_p99_ms 1_000
  @pause_p99_ms 500
  # The join is measured under a W1-shaped load offered at this share of the W1 throughput
  # the same cluster reached just before: a cluster with headroom, as one is run. (At full
  # saturation, two cores shared by four VMs, the load alone makes gaps of over a second
  # in a shard's writes: docs/benchmarks.md.)
  @join_load 0.5

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
          reads = reads(c, seconds)
          {c, failover} = if replicas == 3, do: failover(c, kills), else: {c, nil}
          Kuma.Test.Cluster.stop(c)
          # Membership changes on a cluster of their own, whose dead nodes are replaced
          # after 3 s (the failover kills above must not start replacements).
          membership = if replicas == 3, do: membership(opts, modules, p, seconds), else: nil
          row = %{replicas: replicas, w1: w1, w2: w2, reads: reads, failover: failover, membership: membership}
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
        "failover p99 <= #{@failover_p99_ms} ms: #{Table.verdict(r3.failover.p99_ms <= @failover_p99_ms)}; " <>
        "write pause per moved shard p99 <= #{@pause_p99_ms} ms: #{Table.verdict(r3.membership.pause_p99_ms <= @pause_p99_ms)}\n"
    )

    %{single: %{w1_events_per_sec: single_w1, w2_events_per_sec: single_w2}, rows: rows}
  end

  defp print(row, single_w1, single_w2) do
    IO.puts(
      "  replicas: #{row.replicas}: W1 #{Progress.fmt(row.w1.events_per_sec)} ev/s (#{pct(row.w1.events_per_sec, single_w1)} of single node), " <>
        "W2 #{Progress.fmt(row.w2.events_per_sec)} ev/s (#{pct(row.w2.events_per_sec, single_w2)}), p50 #{row.w2.p50_us} us p99 #{row.w2.p99_us} us"
    )

    r = row.reads

    IO.puts(
      "  reads (Kuma.fetch, 200 entities from 3 nodes): #{Progress.fmt(r.reads_per_sec)}/s; on the leader's node " <>
        "p50 #{r.local_p50_us} us p99 #{r.local_p99_us} us; from another node p50 #{r.remote_p50_us} us p99 #{r.remote_p99_us} us"
    )

    if f = row.failover do
      IO.puts(
        "  failover after kill -9 of a leader: p50 #{f.p50_ms} ms, p99 #{f.p99_ms} ms, max #{f.max_ms} ms (#{f.kills} kills)"
      )
    end

    if m = row.membership do
      IO.puts(
        "  join (3 -> 4 nodes): #{m.moved_shards} shards moved in #{m.rebalance_ms} ms; W1-shaped load offered at #{Progress.fmt(m.offered)} ev/s: " <>
          "#{Progress.fmt(m.throughput_before)} ev/s before, " <>
          "#{Progress.fmt(m.throughput_during)} ev/s during; write pause per moved shard p50 #{m.pause_p50_ms} ms, p99 #{m.pause_p99_ms} ms " <>
          "(longest gap before the join, same shards: p50 #{m.gap_before_p50_ms} ms, p99 #{m.gap_before_p99_ms} ms)"
      )

      IO.puts(
        "  node loss (4 -> 3): #{m.restore_shards} shards back to 3 replicas #{m.restore_ms} ms after the grace period " <>
          "(#{Float.round(m.restore_bytes / 1.0e6, 1)} MB of shard files on the lost node: #{m.restore_ms_per_gb} ms per GB)"
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
    event = Payload.event(200)
    IO.puts("  W2 cluster: 200 entities, #{seconds} s ...")

    results = on_w2_entities(c, fn ids -> {:w2, [@store, ids, event, seconds]} end)

    events = results |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    %{0.5 => p50, 0.99 => p99} = Kuma.Bench.Table.percentiles(Enum.flat_map(results, &elem(&1, 1)), [0.5, 0.99])
    %{events_per_sec: round(events / seconds), p50_us: p50, p99_us: p99}
  end

  # Runs a Kuma.Bench.ClusterLoad function on every node at once, each node given a third
  # of the 200 W2 entities (`load.(ids)` names it and its arguments); their results.
  defp on_w2_entities(c, load) do
    names = Kuma.Test.Cluster.names(c)

    names
    |> Enum.with_index()
    |> Enum.map(fn {name, i} ->
      {fun, args} = load.(for n <- 1..200, rem(n, length(names)) == i, do: "w2:#{n}")
      Task.async(fn -> Kuma.Test.Cluster.call(c, name, Kuma.Bench.ClusterLoad, fun, args, :infinity) end)
    end)
    |> Task.await_many(:infinity)
  end

  # Reads of the W2 entities' state, each entity read by a process on one of the nodes:
  # on the leader's node a read is confirmed with the group (Kuma.Cluster.Route), from
  # another it is also sent there.
  defp reads(c, seconds) do
    IO.puts("  reads cluster: 200 entities, #{seconds} s ...")

    results = on_w2_entities(c, fn ids -> {:reads, [@store, ids, seconds]} end)

    reads = results |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    pct = fn lat -> Kuma.Bench.Table.percentiles(lat, [0.5, 0.99]) end
    local = pct.(Enum.flat_map(results, &elem(&1, 1)))
    remote = pct.(Enum.flat_map(results, &elem(&1, 2)))

    %{
      reads_per_sec: round(reads / seconds),
      local_p50_us: local[0.5],
      local_p99_us: local[0.99],
      remote_p50_us: remote[0.5],
      remote_p99_us: remote[0.99]
    }
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

    %{0.5 => p50, 0.99 => p99} = Kuma.Bench.Table.percentiles(times, [0.5, 0.99])
    {c, %{kills: kills, p50_ms: p50, p99_ms: p99, max_ms: Enum.max(times), all_ms: Enum.reverse(times)}}
  end

  # A fourth node joins under a steady W1-shaped load from the three others, with a probe
  # appending to one entity of every shard without pause: the time until every shard is
  # where placement puts it, the load's throughput before and during the rebalance, and
  # each moved shard's longest gap between two acknowledged probe appends (its write
  # pause). Then the new node is killed: the time until its replicas are rebuilt on the
  # others (after the 3 s grace period), per GB of shard data moved.
  defp membership(opts, modules, p, seconds) do
    alias Kuma.Test.Cluster
    opts = Keyword.update!(opts, :cluster, &Keyword.put(&1, :replace_after, 3_000))
    {:ok, c} = Cluster.start(3, @store, opts, modules)

    try do
      capacity = w1(c, p).events_per_sec
      join_and_loss(c, p, seconds, capacity)
    after
      Cluster.stop(c)
    end
  end

  defp join_and_loss(c, p, seconds, capacity) do
    alias Kuma.Test.Cluster
    names = Cluster.names(c)
    [a | _] = names
    {:ok, before} = Cluster.call(c, a, Kuma, :cluster_info, [@store])
    probes = probe_ids(c, a, length(before.shards))
    pids = for id <- probes, do: Cluster.call(c, a, Kuma.Bench.ClusterLoad, :probe, [@store, id])
    batch = List.duplicate(Payload.event(p.payload), p.batch)
    offered = round(capacity * @join_load)
    writers = div(p.writers, 3) * 3
    # Each writer appends `p.batch` events once per interval: together, `offered` ev/s.
    interval_ms = writers * p.batch * 1000 / max(offered, 1)

    IO.puts(
      "  membership: a 4th node joins under a W1-shaped load from 3 nodes, offered at #{Progress.fmt(offered)} ev/s " <>
        "(#{round(@join_load * 100)}% of the #{Progress.fmt(capacity)} ev/s W1 reached on this cluster) ..."
    )

    load =
      for {name, i} <- Enum.with_index(names) do
        args = [@store, div(p.writers, 3), batch, p.entities, 100 + i, interval_ms]
        {name, Cluster.call(c, name, Kuma.Bench.ClusterLoad, :steady_start, args)}
      end

    t0 = System.os_time(:millisecond)
    Process.sleep(seconds * 1000)
    t_add = System.os_time(:millisecond)
    {{:ok, _}, d, c} = Cluster.add_node(c)
    t_started = System.os_time(:millisecond)
    wait_placed(c, a)
    t_done = System.os_time(:millisecond)

    acks =
      Enum.flat_map(load, fn {name, pid} ->
        Cluster.call(c, name, Kuma.Bench.ClusterLoad, :steady_stop, [pid], 150_000)
      end)

    probe_acks = for pid <- pids, do: Cluster.call(c, a, Kuma.Bench.ClusterLoad, :stop_probe, [pid])
    {:ok, after_join} = Cluster.call(c, a, Kuma, :cluster_info, [@store])

    rate = fn from, to ->
      round(Enum.count(acks, &(&1 >= from and &1 < to)) * p.batch / max((to - from) / 1000, 0.001))
    end

    moved =
      for {b, x} <- Enum.zip(before.shards, after_join.shards),
          Enum.sort(b.members) != Enum.sort(x.members),
          do: b.shard

    # A shard's longest gap between two acknowledged probe appends within a window.
    gap = fn shard, from, to ->
      probe_acks
      |> Enum.at(shard)
      |> Enum.map(&elem(&1, 1))
      |> Enum.filter(&(&1 >= from and &1 <= to))
      |> Enum.chunk_every(2, 1, :discard)
      |> Enum.map(fn [x, y] -> y - x end)
      |> Enum.max(fn -> to - from end)
    end

    pauses = for shard <- moved, do: gap.(shard, t_add, t_done + 1_000)
    # The same under the load alone, before the join, for comparison.
    baseline = for shard <- moved, do: gap.(shard, t0 + 1_000, t_add)
    pct = &Kuma.Bench.Table.percentiles(if(&1 == [], do: [0], else: &1), [0.5, 0.99])
    %{0.5 => pause_p50, 0.99 => pause_p99} = pct.(pauses)
    %{0.5 => base_p50, 0.99 => base_p99} = pct.(baseline)

    # The new node dies; its replicas are rebuilt on the three others.
    dn = Cluster.node_of(c, d)
    held = for sh <- after_join.shards, dn in sh.members, do: sh.shard
    bytes = Cluster.call(c, d, Kuma.Bench.ClusterLoad, :shard_bytes, [Cluster.data_dir(c, d)])
    t_kill = System.os_time(:millisecond)
    c = Cluster.kill9(c, d)
    wait_placed(c, a, &(not Map.has_key?(&1.nodes, dn)))
    restore_ms = System.os_time(:millisecond) - t_kill - 3_000
    Cluster.stop(c)

    %{
      offered: offered,
      rebalance_ms: t_done - t_started,
      moved_shards: length(moved),
      throughput_before: rate.(t0 + 1_000, t_add),
      throughput_during: rate.(t_started, max(t_done, t_started + 1_000)),
      pause_p50_ms: pause_p50,
      pause_p99_ms: pause_p99,
      gap_before_p50_ms: base_p50,
      gap_before_p99_ms: base_p99,
      restore_ms: restore_ms,
      restore_shards: length(held),
      restore_bytes: bytes,
      restore_ms_per_gb: round(restore_ms / max(bytes / 1.0e9, 1.0e-9))
    }
  end

  # One probe entity per shard.
  defp probe_ids(c, name, shards) do
    found =
      Enum.reduce_while(Stream.iterate(0, &(&1 + 1)), %{}, fn i, acc ->
        id = "probe-#{i}"
        shard = Kuma.Test.Cluster.call(c, name, Kuma.Bench.ClusterLoad, :shard_of, [@store, id])
        acc = Map.put_new(acc, shard, id)
        if map_size(acc) == shards, do: {:halt, acc}, else: {:cont, acc}
      end)

    for shard <- 0..(shards - 1), do: found[shard]
  end

  defp wait_placed(c, name, extra \\ fn _ -> true end) do
    {:ok, info} = Kuma.Test.Cluster.call(c, name, Kuma, :cluster_info, [@store])
    active = for {n, %{state: :active}} <- info.nodes, do: n

    placed =
      info.moves == [] and extra.(info) and
        Enum.all?(
          info.shards,
          &(Enum.sort(&1.members) == Enum.sort(Kuma.Cluster.placement(info.cluster_id, active, &1.shard, 3)))
        )

    unless placed do
      Process.sleep(100)
      wait_placed(c, name, extra)
    end
  end
end
