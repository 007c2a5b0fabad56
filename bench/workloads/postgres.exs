# PG: the W1 and W2 shapes against PostgreSQL on this machine, for comparison. A throwaway
# cluster on a unix socket, driven by pgbench (no BEAM, no hex driver). Skipped, with a
# message, when PostgreSQL's server binaries are not installed. See docs/benchmarks.md.

defmodule Kuma.Bench.Postgres do
  @moduledoc false
  alias Kuma.Bench.Progress

  # The usual event-store table (EventStore/Commanded, Marten): the stream's version is
  # unique, which is the optimistic-concurrency check.
  @schema """
  CREATE TABLE events (
    stream_id  text NOT NULL,
    version    integer NOT NULL,
    type       text NOT NULL,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, version)
  );
  """

  # One append of `n` events to one stream of 10,000: 200 clients own 50 streams each, so
  # versions never collide (as with Kuma's single writer per entity); the next version is
  # read in the same statement through the primary key.
  defp append_script(n) do
    """
    \\set s random(0, 49)
    INSERT INTO events (stream_id, version, type, data)
      SELECT 'user_' || (:client_id * 50 + :s), c.v + g, 'deposited', convert_to(repeat('x', 200), 'UTF8')
      FROM (SELECT coalesce(max(version), 0) AS v FROM events WHERE stream_id = 'user_' || (:client_id * 50 + :s)) c,
           generate_series(1, #{n}) g;
    """
  end

  def run(quick) do
    case binaries() do
      {:error, why} ->
        IO.puts("PG: skipped: #{why}\n")
        %{skipped: why}

      {:ok, bin} ->
        run_with(bin, quick)
    end
  end

  defp binaries do
    case Path.wildcard("/usr/lib/postgresql/*/bin/pgbench") |> Enum.sort() |> List.last() do
      nil -> {:error, "PostgreSQL is not installed (Debian: apt-get install postgresql postgresql-contrib)"}
      pgbench -> {:ok, Path.dirname(pgbench)}
    end
  end

  defp run_with(bin, quick) do
    root = Path.join(System.tmp_dir!(), "kuma_bench_pg_#{System.unique_integer([:positive])}")
    File.mkdir_p!(root)
    # initdb refuses to run as root: then the cluster belongs to the postgres user.
    as = if System.get_env("USER") == "root" or elem(System.cmd("id", ["-u"]), 0) == "0\n", do: "postgres"
    if as, do: {_, 0} = System.cmd("chown", [as, root])
    data = Path.join(root, "data")
    version = cmd(as, Path.join(bin, "postgres"), ["--version"]) |> elem(0) |> String.trim()
    IO.puts("PG: #{version}, throwaway cluster on a unix socket in #{root}, driven by pgbench (200 clients, 2 threads)")

    try do
      {_, 0} = cmd(as, Path.join(bin, "initdb"), ["-D", data, "-A", "trust", "-U", "bench", "--no-sync", "-E", "UTF8"])

      {_, 0} =
        cmd(as, Path.join(bin, "pg_ctl"), [
          "-D",
          data,
          "-w",
          "-l",
          Path.join(root, "log"),
          "-o",
          "-k #{root} -c listen_addresses='' -c max_connections=300 -c shared_buffers=2GB -c max_wal_size=8GB",
          "start"
        ])

      psql = fn sql ->
        cmd(as, Path.join(bin, "psql"), ["-h", root, "-U", "bench", "-d", "postgres", "-q", "-c", sql])
      end

      {_, 0} = psql.(@schema)

      events = if quick, do: 200_000, else: 1_000_000
      seconds = if quick, do: 5, else: 30
      w1_script = Path.join(root, "w1.sql")
      w2_script = Path.join(root, "w2.sql")
      File.write!(w1_script, append_script(100))
      File.write!(w2_script, append_script(1))
      for f <- [w1_script, w2_script], as, do: System.cmd("chown", [as, f])

      rows =
        for {sync, setting} <- [normal: "off", full: "on"] do
          {_, 0} = psql.("ALTER SYSTEM SET synchronous_commit = #{setting}")
          {_, 0} = psql.("SELECT pg_reload_conf()")
          {_, 0} = psql.("TRUNCATE events")
          IO.puts(" W1 shape, synchronous_commit=#{setting}: #{Progress.fmt(events)} events, appends of 100 ...")
          w1_tps = pgbench(as, bin, root, w1_script, ["-t", Integer.to_string(div(events, 100 * 200))])
          {_, 0} = psql.("TRUNCATE events")
          IO.puts(" W2 shape, synchronous_commit=#{setting}: one event per transaction, #{seconds} s ...")
          w2_tps = pgbench(as, bin, root, w2_script, ["-T", Integer.to_string(seconds)])

          row = %{
            sync: sync,
            synchronous_commit: setting,
            w1_events_per_sec: round(w1_tps * 100),
            w2_events_per_sec: round(w2_tps)
          }

          IO.puts("  W1: #{Progress.fmt(row.w1_events_per_sec)} ev/s, W2: #{Progress.fmt(row.w2_events_per_sec)} ev/s")
          row
        end

      IO.puts("")
      %{version: version, events: events, w2_seconds: seconds, rows: rows}
    after
      cmd(as, Path.join(bin, "pg_ctl"), ["-D", data, "-m", "immediate", "stop"])
      File.rm_rf!(root)
    end
  end

  defp pgbench(as, bin, root, script, args) do
    {out, 0} =
      cmd(
        as,
        Path.join(bin, "pgbench"),
        ["-h", root, "-U", "bench", "-n", "-c", "200", "-j", "2", "-M", "prepared", "-f", script | args] ++ ["postgres"]
      )

    [_, tps] = Regex.run(~r/tps = ([\d.]+) \(without initial connection time\)/, out)
    String.to_float(tps)
  end

  defp cmd(nil, exe, args), do: System.cmd(exe, args, stderr_to_stdout: true)
  defp cmd(user, exe, args), do: System.cmd("runuser", ["-u", user, "--", exe | args], stderr_to_stdout: true)
end
