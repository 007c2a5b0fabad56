# OPS: what operating a store costs. See docs/benchmarks.md ("Operations").

defmodule Kuma.Bench.Ops do
  @moduledoc false
  # 1. W1 (sync: :normal) on a store with its HTTP endpoint on, /metrics and /stats.json
  #    scraped every second, and a telemetry handler attached beside the metrics' own,
  #    against the same W1 without any of it: alternating runs, the medians compared
  #    (target: a cost of at most 3%).
  # 2. An online backup of a store holding W1's events, taken while W1 runs on it: the
  #    backup's MB/s, and W1's rate while the backup runs.

  alias Kuma.Bench.{Progress, Stores, Table, W1}

  @target_cost 0.03

  def run(quick) do
    p = W1.params(quick) |> Map.put(:sync, :normal)
    rounds = if quick, do: 2, else: 3

    IO.puts(
      "OPS: W1 (#{Progress.fmt(p.events)} events, sync=normal) with the HTTP endpoint scraped every second " <>
        "and a telemetry handler attached, against none; #{rounds} alternating runs each"
    )

    runs =
      for round <- 1..rounds, on <- [false, true] do
        rate = w1(p, on, "OPS round #{round} #{if on, do: "http+telemetry", else: "plain"}")
        {on, rate}
      end

    off = median(for {false, r} <- runs, do: r)
    on = median(for {true, r} <- runs, do: r)
    cost = Float.round((off - on) / off, 3)

    IO.puts(" backup while W1 runs ...")
    backup = backup_under_load(p)

    IO.puts("\nOPS results")

    IO.puts(
      String.pad_trailing("W1 ev/s", 28) <> Table.pad("plain") <> Table.pad("http+telemetry") <> Table.pad("cost")
    )

    IO.puts(
      String.pad_trailing("median of #{rounds}", 28) <>
        Table.pad(Progress.fmt(off)) <> Table.pad(Progress.fmt(on)) <> Table.pad("#{Float.round(cost * 100, 1)}%")
    )

    IO.puts("  target: cost <= #{round(@target_cost * 100)}%: #{Table.verdict(cost <= @target_cost)}")

    IO.puts(
      "  backup: #{Float.round(backup.mib, 1)} MiB in #{backup.seconds} s = #{backup.mib_per_s} MiB/s while W1 ran; " <>
        "W1 during the backup #{Progress.fmt(backup.w1_during)} ev/s (alone #{Progress.fmt(off)})"
    )

    %{
      w1_plain: for({false, r} <- runs, do: r),
      w1_http_telemetry: for({true, r} <- runs, do: r),
      w1_plain_median: off,
      w1_http_telemetry_median: on,
      cost: cost,
      target_cost: @target_cost,
      met: cost <= @target_cost,
      backup: backup
    }
  end

  defp median(list), do: list |> Enum.sort() |> Enum.at(div(length(list), 2))

  # One W1 run; with `on`, the endpoint is scraped every second and a handler listens.
  defp w1(p, on, label) do
    opts = [shards: p.shards, sync: p.sync] ++ if(on, do: [http: [port: 0]], else: [])

    Stores.with_store(opts, fn store ->
      stop =
        if on do
          :ok =
            Kuma.Telemetry.attach(
              {__MODULE__, store},
              [[:kuma, :append, :stop]],
              fn _, m, _, c -> :counters.add(c, 1, m.events) end,
              :counters.new(1, [])
            )

          scraper(Kuma.HTTP.url(store))
        end

      micros = W1.drive(store, p, label)

      if on do
        send(stop, :stop)
        Kuma.Telemetry.detach({__MODULE__, store})
      end

      round(p.events / (micros / 1_000_000))
    end)
  end

  defp scraper(url) do
    %URI{host: host, port: port} = URI.parse(url)

    spawn_link(fn ->
      Stream.repeatedly(fn -> :ok end)
      |> Enum.reduce_while(:ok, fn _, _ ->
        for path <- ["/metrics", "/stats.json"] do
          {:ok, sock} = :gen_tcp.connect(String.to_charlist(host), port, [:binary, active: false])
          :ok = :gen_tcp.send(sock, "GET #{path} HTTP/1.1\r\nhost: x\r\n\r\n")
          drain(sock)
        end

        receive do
          :stop -> {:halt, :ok}
        after
          1_000 -> {:cont, :ok}
        end
      end)
    end)
  end

  defp drain(sock) do
    case :gen_tcp.recv(sock, 0, 5_000) do
      {:ok, _} -> drain(sock)
      _ -> :gen_tcp.close(sock)
    end
  end

  # W1's events loaded first, then W1 again while a backup is taken.
  defp backup_under_load(p) do
    Stores.with_store([shards: p.shards, sync: p.sync], fn store ->
      W1.drive(store, p, "OPS backup: loading")
      {:ok, info} = Kuma.info(store)
      dir = Path.join(System.tmp_dir!(), "kuma_bench_backup_#{System.unique_integer([:positive])}")
      load = Task.async(fn -> W1.drive(store, p, "OPS backup: W1 during") end)
      # Let W1 get going first.
      Process.sleep(500)
      t0 = System.monotonic_time(:microsecond)
      written0 = writer_events(store)
      {:ok, b} = Kuma.backup(store, dir)
      t1 = System.monotonic_time(:microsecond)
      written1 = writer_events(store)
      Task.await(load, :infinity)
      File.rm_rf!(dir)
      secs = (t1 - t0) / 1_000_000
      mib = b.bytes / 1_048_576

      %{
        shards: info.shards,
        mib: Float.round(mib, 1),
        seconds: Float.round(secs, 2),
        mib_per_s: Float.round(mib / secs, 1),
        w1_during: round((written1 - written0) / secs)
      }
    end)
  end

  defp writer_events(store) do
    {:ok, info} = Kuma.info(store)
    info.writers |> Enum.map(& &1.events) |> Enum.sum()
  end
end
