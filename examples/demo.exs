# Kuma's demo: starts a store in ./data (or --data-dir DIR), writes a few bank accounts as
# event streams, reads them back, verifies their hash chains, exports and erases a
# customer, and prints each step. Run it twice: the second run finds the first run's
# events and continues their streams.
#
#     mix run examples/demo.exs
#     mix run examples/demo.exs --data-dir /tmp/kuma-demo --shards 4
#     mix run examples/demo.exs --serve          # keeps the store and its monitor up
#
# While it runs, the store serves its live monitor and Prometheus metrics on
# http://127.0.0.1:9568/ (--port P; another free port if that one is taken); with --serve
# it stays up, writing a gentle stream of sensor readings, until Ctrl-C.
#
# The store is encrypted. Its master key comes from KUMA_MASTER_KEY if set; otherwise the
# demo creates one in ~/.config/kuma/demo-master.key (mode 0600), outside the data dir,
# and says so. A real deployment takes the key from a secret manager.
# (bin/demo runs this; test/examples_test.exs runs it too, so it keeps working.)

defmodule Kuma.Examples.Demo do
  def main(args) do
    {opts, _, _} = OptionParser.parse(args, strict: [data_dir: :string, shards: :integer, serve: :boolean, port: :integer])
    run(Path.expand(Keyword.get(opts, :data_dir, "data")), Keyword.get(opts, :shards, 16), opts)
  end

  def run(data_dir, shards, opts \\ []) do
    say("Kuma demo: data dir #{data_dir}, #{shards} shards")

    {:ok, store} = start(data_dir, shards, Keyword.get(opts, :port, 9568))
    {:ok, %{http: monitor}} = Kuma.info(store)
    say("Live monitor: #{monitor} (Prometheus metrics: #{monitor}metrics)")

    accounts = ["alice", "bob", "carol"]

    for id <- accounts do
      {:ok, head} = Kuma.head(store, id)
      before = if head, do: head.seq, else: 0
      events = if before == 0, do: [{:opened, %{owner: id}}], else: []
      events = events ++ [{:credited, %{amount: 100}}, {:debited, %{amount: 30}}]
      {:ok, last} = Kuma.append(store, id, events, expected_seq: before, metadata: %{source: "demo"})
      {:ok, shard} = Kuma.shard_for(store, id)
      say("  appended #{length(events)} events to #{id} (shard #{shard}): seq #{before + 1}..#{last}")
    end

    say("A stale write is refused and changes nothing:")
    {:error, reason} = Kuma.append(store, "alice", {:debited, %{amount: 1}}, expected_seq: 0)
    say("  " <> Kuma.format_error(reason))

    say("Bulk ingest of 10,000 events over 100 sensors in one call:")
    entries = for s <- 1..100, do: {"sensor-#{s}", Enum.map(1..100, &{:reading, %{value: &1}})}
    {micros, {:ok, _}} = :timer.tc(fn -> Kuma.append_batch(store, entries) end)
    say("  committed in #{div(micros, 1000)} ms")

    say("Reading back (balance = credits - debits, folded from the events):")

    for id <- accounts do
      events = Kuma.stream(store, id) |> Enum.to_list()
      balance = Enum.reduce(events, 0, &apply_event/2)
      {:ok, %{events: n, hash: hash}} = Kuma.verify(store, id)

      say(
        "  #{id}: #{n} events, balance #{balance}, chain verified, head #{Base.encode16(hash, case: :lower) |> binary_part(0, 16)}..."
      )
    end

    protection(store, data_dir)

    {:ok, summary} = Kuma.verify_store(store)
    say("Whole store verified: #{summary.events} events of #{summary.entities} entities in #{summary.shards} shards")
    backup(store, data_dir)

    if opts[:serve] do
      serve(store, monitor)
    else
      :ok = Kuma.stop(store)
      say("Stopped. Run it again: the streams continue where they ended (bin/demo --serve keeps the monitor up).")
    end
  end

  # An online backup, restored and verified beside the data dir, then removed.
  defp backup(store, data_dir) do
    dir = Path.join(System.tmp_dir!(), "kuma-demo-#{System.unique_integer([:positive])}")
    {:ok, b} = Kuma.backup(store, Path.join(dir, "backup"), keystore: true)

    say(
      "Online backup: #{Float.round(b.bytes / 1_048_576, 1)} MiB in #{b.segments} CRC32-framed segments " <>
        "in #{round(b.seconds * 1000)} ms (writes could go on meanwhile)"
    )

    {:ok, r} = Kuma.restore(Path.join(dir, "backup"), Path.join(dir, "restored"), Kuma.IEx.master_key())
    say("  restored to a new data dir and verified: #{r.events} events of #{r.entities} entities (#{Path.basename(data_dir)} untouched)")
    File.rm_rf!(dir)
  end

  # Keeps the store up with a gentle load until the VM is stopped (Ctrl-C).
  defp serve(store, monitor) do
    say("Serving the monitor at #{monitor}: writing about 500 sensor readings a second; Ctrl-C to stop.")

    Stream.iterate(0, &(&1 + 1))
    |> Enum.each(fn i ->
      entries = for s <- 1..10, do: {"sensor-#{rem(i * 10 + s, 200)}", [{:reading, %{value: rem(i, 100)}}]}
      {:ok, _} = Kuma.append_batch(store, entries)
      Process.sleep(20)
    end)
  end

  defp start(data_dir, shards, port) do
    opts = [name: :kuma_demo, data_dir: data_dir, shards: shards, http: [port: port]]

    opts =
      if System.get_env("KUMA_MASTER_KEY") in [nil, ""] do
        key_file = Kuma.IEx.demo_key_file()
        say("Master key: #{key_file} (outside the data dir; set KUMA_MASTER_KEY to use your own)")
        Keyword.put(opts, :master_key_file, key_file)
      else
        say("Master key: from KUMA_MASTER_KEY")
        opts
      end

    case Kuma.start(opts) do
      {:ok, store} ->
        {:ok, store}

      {:error, {:http, address, :eaddrinuse}} ->
        say("  #{address} is taken: serving the monitor on another free port")
        Kuma.start(Keyword.put(opts, :http, port: 0))

      {:error, {:encryption_mismatch, :store_is_plain}} ->
        say("  #{data_dir} was created without encryption (by an older demo): opening it as it is")
        Kuma.start(Keyword.put(opts, :encryption, false))

      {:error, reason} ->
        raise "cannot start the store: " <> Kuma.format_error(reason)
    end
  end

  # Export and erasure of one customer named inside alice's stream.
  defp protection(store, data_dir) do
    {:ok, info} = Kuma.info(store)

    if info.encrypted do
      customer = "customer-#{System.os_time(:millisecond)}"
      say("Data protection, with #{customer} (every event sealed under the customer's own key):")
      {:ok, _} = Kuma.append(store, customer, [{:registered, %{email: "#{customer}@example.com"}}, {:logged_in, %{}}])

      {:ok, seq} =
        Kuma.append(
          store,
          "alice",
          {:paid, %{to: Kuma.sensitive(customer, "Dana Scully", placeholder: "D***"), amount: 5}}
        )

      {:ok, json} = Kuma.export_json(store, customer)
      export = Path.join(Path.dirname(data_dir), "#{customer}.export.json")
      File.write!(export, json)
      say("  exported #{customer}: #{byte_size(json)} bytes of JSON in #{Path.relative_to_cwd(export)}")
      say("  alice's payment #{seq} names them: #{payee(store, seq)}")
      {micros, {:ok, %{events_deleted: n}}} = :timer.tc(fn -> Kuma.delete(store, customer) end)
      say("  erased #{customer} in #{Float.round(micros / 1000, 1)} ms: #{n} events deleted, key destroyed")
      say("  an append to it now: #{Kuma.format_error(elem(Kuma.append(store, customer, :again), 1))}")
      {:ok, %{events: events}} = Kuma.verify(store, "alice")
      say("  alice's payment #{seq} now shows #{payee(store, seq)}; her #{events}-event chain still verifies")
      File.rm(export)
    else
      say("Data protection: skipped (this data dir was created without encryption)")
    end
  end

  defp payee(store, seq) do
    {:ok, [%{data: {:paid, %{to: to}}}]} = Kuma.events(store, "alice", from: seq, limit: 1)
    inspect(Kuma.Sensitive.value(to))
  end

  defp apply_event(%Kuma.Envelope{data: {:credited, %{amount: a}}}, balance), do: balance + a
  defp apply_event(%Kuma.Envelope{data: {:debited, %{amount: a}}}, balance), do: balance - a
  defp apply_event(_event, balance), do: balance

  defp say(line), do: IO.puts(line)
end

Kuma.Examples.Demo.main(System.argv())
