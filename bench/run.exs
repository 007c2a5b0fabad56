# Kuma's benchmark suite: `mix bench` (everything), `mix bench --quick`, `mix bench W1`.
#
# Every workload prints progress while it runs, then one table with Kuma's figures beside
# the raw SQLite ceiling measured in the same session, and writes bench/results/<date>.json
# with the machine's facts. Methodology: docs/benchmarks.md.

defmodule Kuma.Bench.Machine do
  @moduledoc false

  def facts do
    %{
      cores: :erlang.system_info(:logical_processors),
      schedulers: :erlang.system_info(:schedulers_online),
      memory_gib: mem_gib(),
      cpu: cpu_model(),
      os: os(),
      otp: :erlang.system_info(:otp_release) |> to_string(),
      erts: :erlang.system_info(:version) |> to_string(),
      elixir: System.version(),
      rust: cmd("rustc", ["--version"]),
      sqlite: Kuma.Bench.Ceiling.sqlite_version(),
      disk: cmd("df", ["-h", System.tmp_dir!()]) |> String.split("\n") |> List.last()
    }
  end

  defp mem_gib do
    with {:ok, text} <- File.read("/proc/meminfo"),
         [_, kb] <- Regex.run(~r/MemTotal:\s+(\d+) kB/, text) do
      Float.round(String.to_integer(kb) / 1024 / 1024, 1)
    else
      _ -> nil
    end
  end

  defp cpu_model do
    with {:ok, text} <- File.read("/proc/cpuinfo"), [_, m] <- Regex.run(~r/model name\s*:\s*(.+)/, text) do
      m
    else
      _ -> "unknown"
    end
  end

  defp os do
    case File.read("/etc/os-release") do
      {:ok, text} -> Regex.run(~r/PRETTY_NAME="([^"]+)"/, text, capture: :all_but_first) |> List.wrap() |> List.first()
      _ -> "unknown"
    end
  end

  def cmd(bin, args) do
    case System.find_executable(bin) do
      nil ->
        "not found"

      path ->
        {out, _} = System.cmd(path, args, stderr_to_stdout: true)
        String.trim(out)
    end
  end
end

defmodule Kuma.Bench.Ceiling do
  @moduledoc false
  # Runs native/kuma_ceiling (raw rusqlite, no BEAM, no hashing) with W1's parameters.

  @root Path.expand("..", __DIR__)

  def binary do
    path = Path.join(@root, "target/release/kuma_ceiling")
    cargo = System.find_executable("cargo") || Path.expand("~/.cargo/bin/cargo")
    {_, 0} = System.cmd(cargo, ["build", "--release", "-q", "-p", "kuma_ceiling"], cd: @root, stderr_to_stdout: true)
    path
  end

  def sqlite_version do
    case run(events: 1000, entities: 10, shards: 1, layout: "plain") do
      %{"sqlite" => v} -> v
      _ -> "unknown"
    end
  end

  def run(opts) do
    dir = Path.join(System.tmp_dir!(), "kuma_ceiling_#{System.unique_integer([:positive])}")

    args = Enum.flat_map(opts, fn {k, v} -> ["--#{k}", to_string(v)] end) ++ ["--dir", dir]

    {out, 0} = System.cmd(binary(), args, stderr_to_stdout: true)
    File.rm_rf!(dir)
    # One line of flat JSON: pick the fields with a regex (no JSON parser without hex).
    Regex.scan(~r/"(\w+)":("([^"]*)"|[-\d.]+)/, out)
    |> Map.new(fn
      [_, k, _, s] when s != "" -> {k, s}
      [_, k, v | _] -> {k, parse_num(v)}
    end)
  end

  defp parse_num(v) do
    if String.contains?(v, "."), do: String.to_float(v), else: String.to_integer(v)
  end
end

defmodule Kuma.Bench.Progress do
  @moduledoc false
  # Prints "<label>: 42% (420,000 events, 310,000 ev/s)" about once a second.

  def start(label, total, counter) do
    parent = self()
    t0 = System.monotonic_time(:millisecond)

    spawn_link(fn -> loop(parent, label, total, counter, t0) end)
  end

  defp loop(parent, label, total, counter, t0) do
    receive do
      :stop -> :ok
    after
      1000 ->
        done = :counters.get(counter, 1)
        secs = max(System.monotonic_time(:millisecond) - t0, 1) / 1000
        pct = if total > 0, do: round(done * 100 / total), else: 0
        IO.puts("  #{label}: #{pct}% (#{fmt(done)} events, #{fmt(round(done / secs))} ev/s)")
        loop(parent, label, total, counter, t0)
    end
  end

  def stop(pid), do: send(pid, :stop)

  def fmt(n) when is_integer(n) do
    n |> Integer.to_string() |> String.reverse() |> String.replace(~r/(\d{3})(?=\d)/, "\\1,") |> String.reverse()
  end

  def fmt(n) when is_float(n), do: :erlang.float_to_binary(n, decimals: 1)
end

defmodule Kuma.Bench.W1 do
  @moduledoc false
  # The seed workload: N events, E entities, W concurrent writers each appending batches of
  # B events to one random entity, 16 shards, 200-byte payloads.

  alias Kuma.Bench.Progress

  def payload_event(bytes) do
    # A {:deposited, binary} whose term_to_binary is exactly `bytes` long.
    overhead = byte_size(:erlang.term_to_binary({:deposited, <<>>}))
    {:deposited, :binary.copy("x", bytes - overhead)}
  end

  def run(p) do
    dir = Path.join(System.tmp_dir!(), "kuma_bench_w1_#{System.unique_integer([:positive])}")
    name = :"bench_w1_#{p.sync}"
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: p.shards, sync: p.sync)
    event = payload_event(p.payload)
    batch = List.duplicate(event, p.batch)
    appends = div(p.events, p.batch)
    counter = :counters.new(1, [:write_concurrency])
    progress = Progress.start("W1 sync=#{p.sync}", p.events, counter)

    {micros, _} =
      :timer.tc(fn ->
        1..p.writers
        |> Enum.map(fn w ->
          # Writer w does appends w, w+W, w+2W, ...: the appends are split evenly.
          mine = length(Enum.to_list(w..appends//p.writers))

          Task.async(fn ->
            :rand.seed(:exsss, {w, 17, 31})

            for _ <- 1..mine//1 do
              id = "user_#{:rand.uniform(p.entities)}"
              {:ok, _} = Kuma.append(store, id, batch)
              :counters.add(counter, 1, p.batch)
            end
          end)
        end)
        |> Task.await_many(:infinity)
      end)

    Progress.stop(progress)
    {:ok, info} = Kuma.info(store)
    txns = info.writers |> Enum.map(& &1.transactions) |> Enum.sum()
    :ok = Kuma.stop(store)
    File.rm_rf!(dir)
    secs = micros / 1_000_000
    %{events: p.events, seconds: Float.round(secs, 3), events_per_sec: round(p.events / secs), transactions: txns}
  end
end

defmodule Kuma.Bench.NifCost do
  @moduledoc false
  # How long an append NIF call holds its scheduler, by size, on the normal and the dirty
  # CPU path. Measured against a closed store so only decoding and copying are timed
  # (queueing adds a channel send).

  def run(quick) do
    dir = Path.join(System.tmp_dir!(), "kuma_bench_nif_#{System.unique_integer([:positive])}")
    {:ok, store} = Kuma.start(name: :bench_nif, data_dir: dir, shards: 1)
    :ok = Kuma.stop(store)
    event = Kuma.Bench.W1.payload_event(200)
    reps = if quick, do: 200, else: 1000

    rows =
      for n <- [1, 10, 100, 200, 500, 1000] do
        {:ok, encoded, bytes} = Kuma.Codec.encode_events(List.duplicate(event, n), nil)
        normal = time(reps, fn ref -> Kuma.Native.append(store.native, ref, "e", nil, encoded) end)
        dirty = time(reps, fn ref -> Kuma.Native.append_dirty(store.native, ref, "e", nil, encoded) end)

        IO.puts(
          "  #{n} events (#{bytes} B): normal p50 #{normal.p50} us p99 #{normal.p99} us, dirty p50 #{dirty.p50} us"
        )

        %{events: n, bytes: bytes, normal: normal, dirty: dirty}
      end

    File.rm_rf!(dir)
    %{rows: rows}
  end

  defp time(reps, fun) do
    sorted =
      for _ <- 1..reps do
        ref = make_ref()
        t0 = System.monotonic_time(:nanosecond)
        {:error, :store_closed} = fun.(ref)
        System.monotonic_time(:nanosecond) - t0
      end
      |> Enum.sort()

    %{p50: div(Enum.at(sorted, div(reps, 2)), 1000), p99: div(Enum.at(sorted, div(reps * 99, 100)), 1000)}
  end
end

defmodule Kuma.Bench do
  @moduledoc false
  alias Kuma.Bench.{Ceiling, Machine, Progress, W1}

  @targets %{w1_normal: 300_000, w1_ratio: 0.5}

  def main(args) do
    {opts, workloads, _} = OptionParser.parse(args, strict: [quick: :boolean])
    quick = Keyword.get(opts, :quick, false)
    workloads = if workloads == [], do: ["W1", "NIF"], else: Enum.map(workloads, &String.upcase/1)
    facts = Machine.facts()

    IO.puts(
      "Kuma benchmarks #{if quick, do: "(quick)", else: ""} on #{facts.cores} cores, #{facts.memory_gib} GiB, #{facts.cpu}"
    )

    IO.puts("OTP #{facts.otp}, Elixir #{facts.elixir}, #{facts.rust}, SQLite #{facts.sqlite}\n")

    results =
      for w <- workloads, into: %{} do
        case w do
          "W1" -> {"W1", w1(quick)}
          "NIF" -> {"NIF", nif(quick)}
          other -> Mix.raise("unknown workload #{other}; known: W1, NIF")
        end
      end

    write_results(facts, quick, results)
  end

  defp w1(quick) do
    p = %{
      events: if(quick, do: 200_000, else: 1_000_000),
      entities: 10_000,
      writers: 200,
      batch: 100,
      shards: 16,
      payload: 200
    }

    IO.puts(
      "W1: #{Progress.fmt(p.events)} events, #{Progress.fmt(p.entities)} entities, #{p.writers} writers, " <>
        "appends of #{p.batch}, #{p.shards} shards, #{p.payload}-byte payloads"
    )

    rows =
      for sync <- [:normal, :full] do
        IO.puts(" Kuma, sync=#{sync} ...")
        kuma = W1.run(Map.put(p, :sync, sync))
        # Kuma's writers merge queued appends into one transaction; give the ceiling the same
        # advantage (appends per transaction = Kuma's measured average) as well as the
        # BASELINES setting (one append of 100 per transaction), and compare with the better.
        group = max(round(p.events / kuma.transactions / p.batch), 1)

        base = [
          events: p.events,
          entities: p.entities,
          shards: p.shards,
          threads: 2,
          batch: p.batch,
          payload: p.payload,
          pattern: "entity",
          sync: sync
        ]

        IO.puts(" ceiling (raw rusqlite, Kuma's schema, no BEAM/hashing), sync=#{sync}, 1 and #{group} appends/txn ...")
        strict = Ceiling.run(base ++ [layout: "kuma", group: 1])["events_per_sec"]
        grouped = if group == 1, do: strict, else: Ceiling.run(base ++ [layout: "kuma", group: group])["events_per_sec"]
        plain = Ceiling.run(base ++ [layout: "plain", group: 1])["events_per_sec"]

        %{
          sync: sync,
          kuma: kuma,
          events_per_txn: round(p.events / kuma.transactions),
          ceiling_1_append_per_txn: strict,
          ceiling_grouped: grouped,
          ceiling_group: group,
          plain_table_1_append_per_txn: plain,
          ratio: Float.round(kuma.events_per_sec / max(strict, grouped), 2)
        }
      end

    IO.puts("\nW1 results")

    IO.puts(
      String.pad_trailing("sync", 8) <>
        pad("Kuma ev/s") <>
        pad("ev/txn") <> pad("ceil 1/txn") <> pad("ceil grouped") <> pad("plain 1/txn") <> pad("ratio")
    )

    for r <- rows do
      IO.puts(
        String.pad_trailing(to_string(r.sync), 8) <>
          pad(Progress.fmt(r.kuma.events_per_sec)) <>
          pad(Progress.fmt(r.events_per_txn)) <>
          pad(Progress.fmt(r.ceiling_1_append_per_txn)) <>
          pad(Progress.fmt(r.ceiling_grouped)) <>
          pad(Progress.fmt(r.plain_table_1_append_per_txn)) <> pad(Progress.fmt(r.ratio))
      )
    end

    IO.puts("ratio = Kuma / the better Kuma-schema ceiling (native/kuma_ceiling, same session, 2 threads)")

    normal = Enum.find(rows, &(&1.sync == :normal))

    IO.puts(
      "targets: >= #{Progress.fmt(@targets.w1_normal)} ev/s with sync=normal: #{verdict(normal.kuma.events_per_sec >= @targets.w1_normal)}; " <>
        ">= #{@targets.w1_ratio} of the ceiling: #{verdict(normal.ratio >= @targets.w1_ratio)}\n"
    )

    %{params: p, rows: rows}
  end

  defp nif(quick) do
    IO.puts("NIF: time an append call holds its scheduler (decode + copy), by size")
    Kuma.Bench.NifCost.run(quick)
  end

  defp verdict(true), do: "met"
  defp verdict(false), do: "MISSED"
  defp pad(s), do: String.pad_leading(s, 15)

  defp write_results(facts, quick, results) do
    dir = Path.expand("results", __DIR__)
    File.mkdir_p!(dir)
    stamp = DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601() |> String.replace(":", "")
    path = Path.join(dir, "#{stamp}#{if quick, do: "-quick", else: ""}.json")
    File.write!(path, Kuma.JSON.encode!(%{machine: facts, quick: quick, results: results}) <> "\n")
    IO.puts("results written to #{Path.relative_to_cwd(path)}")
  end
end

Kuma.Bench.main(System.argv())
