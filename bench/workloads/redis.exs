# REDIS: the W1 and W2 shapes against Redis streams on this machine, for comparison. A
# throwaway redis-server on a unix socket with the append-only file on (fsync `everysec`,
# then `always`), driven by redis-benchmark (no BEAM, no hex client). Skipped, with a
# message, when Redis is not installed. See docs/benchmarks.md.

defmodule Kuma.Bench.Redis do
  @moduledoc false
  alias Kuma.Bench.Progress

  # 200 clients, XADD of one ~200-byte event to a random stream of 10,000 (`user:N`), as
  # Kuma's W1/W2 append to random entities. Redis checks no per-stream version and a
  # pipeline is not a transaction: a generous baseline (docs/benchmarks.md).
  @clients 200
  @streams 10_000

  def run(quick) do
    case binaries() do
      {:error, why} ->
        IO.puts("REDIS: skipped: #{why}\n")
        %{skipped: why}

      {:ok, server, bench} ->
        run_with(server, bench, quick)
    end
  end

  defp binaries do
    server = System.find_executable("redis-server")
    bench = System.find_executable("redis-benchmark")

    if server && bench,
      do: {:ok, server, bench},
      else: {:error, "Redis is not installed (Debian: apt-get install redis-server redis-tools)"}
  end

  defp run_with(server, bench, quick) do
    {version, 0} = System.cmd(server, ["--version"])
    version = version |> String.split() |> Enum.find("?", &String.starts_with?(&1, "v=")) |> String.trim_leading("v=")
    requests = if quick, do: 200_000, else: 1_000_000

    IO.puts(
      "REDIS: Redis #{version}, throwaway server on a unix socket, driven by redis-benchmark (#{@clients} clients)"
    )

    rows =
      for fsync <- ["everysec", "always"] do
        with_server(server, fsync, fn socket ->
          IO.puts(" W1 shape, appendfsync #{fsync}: #{Progress.fmt(requests)} events, pipelines of 100 ...")
          w1 = xadd(bench, socket, requests, 100)
          IO.puts(" W2 shape, appendfsync #{fsync}: #{Progress.fmt(div(requests, 2))} events, one per round trip ...")
          w2 = xadd(bench, socket, div(requests, 2), 1)
          IO.puts("  W1: #{Progress.fmt(w1)} ev/s, W2: #{Progress.fmt(w2)} ev/s")
          %{appendfsync: fsync, w1_events_per_sec: w1, w2_events_per_sec: w2}
        end)
      end

    IO.puts("")
    %{version: version, events: requests, clients: @clients, rows: rows}
  end

  # A fresh server in a temporary dir, with the append-only file on; stopped afterwards.
  defp with_server(server, fsync, fun) do
    root = Path.join(System.tmp_dir!(), "kuma_bench_redis_#{System.unique_integer([:positive])}")
    File.mkdir_p!(root)
    socket = Path.join(root, "redis.sock")

    args =
      ~w(--port 0 --unixsocket #{socket} --unixsocketperm 700 --dir #{root} --appendonly yes) ++
        ~w(--appendfsync #{fsync} --save) ++ ["", "--logfile", Path.join(root, "log"), "--daemonize", "no"]

    port = Port.open({:spawn_executable, server}, [:binary, :exit_status, args: args])

    try do
      wait_for(socket, 100)
      fun.(socket)
    after
      {:os_pid, pid} = Port.info(port, :os_pid)
      System.cmd("kill", ["-TERM", Integer.to_string(pid)])

      receive do
        {^port, {:exit_status, _}} -> :ok
      after
        10_000 -> System.cmd("kill", ["-KILL", Integer.to_string(pid)])
      end

      File.rm_rf!(root)
    end
  end

  defp wait_for(socket, 0), do: raise("redis-server did not open #{socket}")

  defp wait_for(socket, tries) do
    if File.exists?(socket) do
      :ok
    else
      Process.sleep(50)
      wait_for(socket, tries - 1)
    end
  end

  # Events per second of `n` XADDs (each one event) in pipelines of `pipeline`.
  defp xadd(bench, socket, n, pipeline) do
    payload = String.duplicate("x", 200)

    {out, 0} =
      System.cmd(
        bench,
        ~w(-s #{socket} -c #{@clients} -n #{n} -P #{pipeline} -r #{@streams} -q) ++
          ["XADD", "user:__rand_int__", "*", "deposited", payload],
        stderr_to_stdout: true
      )

    case Regex.scan(~r/([\d.]+) requests per second/, out) |> List.last() do
      [_, rps] -> round(String.to_float(rps))
      nil -> raise "redis-benchmark printed no rate: #{out}"
    end
  end
end
