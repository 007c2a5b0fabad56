defmodule Kuma.HTTPTest do
  # The store's HTTP endpoint (Kuma.HTTP): /metrics read by an independent parser (Python's
  # prometheus_client) and seen to move under load, the monitor page driven in a real
  # headless browser, and the faults a user meets (port in use, bad options, bad paths).
  use Kuma.StoreCase, async: true

  @moduletag store_opts: [shards: 2, http: [port: 0]]

  defp url(store), do: Kuma.HTTP.url(store)

  # A GET with nothing but :gen_tcp: {status, headers, body}.
  defp get(url, method \\ "GET") do
    %URI{host: host, port: port, path: path} = URI.parse(url)
    {:ok, sock} = :gen_tcp.connect(String.to_charlist(host), port, [:binary, active: false], 5_000)
    :ok = :gen_tcp.send(sock, "#{method} #{path} HTTP/1.1\r\nhost: #{host}\r\n\r\n")
    {:ok, response} = recv_all(sock, "")
    [head, body] = String.split(response, "\r\n\r\n", parts: 2)
    ["HTTP/1.1 " <> status | headers] = String.split(head, "\r\n")
    {String.to_integer(hd(String.split(status))), headers, body}
  end

  defp recv_all(sock, acc) do
    case :gen_tcp.recv(sock, 0, 5_000) do
      {:ok, data} -> recv_all(sock, acc <> data)
      {:error, :closed} -> {:ok, acc}
    end
  end

  # The samples of a scrape, as prometheus_client parses them: %{{name, labels} => value}.
  defp parse(text) do
    script = """
    import json, sys
    from prometheus_client.parser import text_string_to_metric_families
    out = []
    for family in text_string_to_metric_families(sys.stdin.read()):
        for s in family.samples:
            out.append([family.type, s.name, s.labels, s.value])
    print(json.dumps(out))
    """

    path = Path.join(System.tmp_dir!(), "kuma_prom_#{System.unique_integer([:positive])}.txt")
    File.write!(path, text)
    {out, status} = System.cmd("sh", ["-c", "python3 -c \"$0\" < \"$1\"", script, path], stderr_to_stdout: true)
    File.rm(path)
    assert status == 0, "prometheus_client refused the scrape:\n#{out}"

    for [type, name, labels, value] <- Kuma.JSONTestParser.parse!(out), into: %{} do
      {{name, labels}, {type, value}}
    end
  end

  defp value(samples, name, labels \\ %{}) do
    {_type, v} = Map.fetch!(samples, {name, labels})
    v
  end

  @tag :prometheus
  test "/metrics parses as Prometheus text and its values follow the load", %{store: store, name: name} do
    {status, headers, body} = get(url(store) <> "metrics")
    assert status == 200
    assert "content-type: text/plain; version=0.0.4; charset=utf-8" in headers
    before = parse(body)
    st = %{"store" => Atom.to_string(name)}
    assert value(before, "kuma_events_appended_total", st) == 0

    assert {"gauge", 1} =
             before[
               {"kuma_info", Map.merge(st, %{"mode" => "single", "store_id" => elem(Kuma.info(store), 1).store_id})}
             ]

    {:ok, _} = Kuma.Projection.start(store, Kuma.Test.Collector, name: :"#{name}_collector", args: self())

    for i <- 1..150, do: {:ok, _} = Kuma.append(store, "m#{rem(i, 10)}", [{:n, i}, {:n, -i}])
    {:error, {:wrong_expected_seq, _, _}} = Kuma.append(store, "m1", [:late], expected_seq: 0)

    :ok =
      eventually(fn -> match?({:ok, %{lag: 0, handled: 300}}, Kuma.Projection.status(:"#{name}_collector")) end) && :ok

    after_load = parse(elem(get(url(store) <> "metrics"), 2))
    assert value(after_load, "kuma_events_appended_total", st) == 300
    assert value(after_load, "kuma_appends_total", st) == 150
    assert value(after_load, "kuma_append_errors_total", st) == 1
    assert value(after_load, "kuma_bytes_appended_total", st) > 300
    assert value(after_load, "kuma_append_duration_seconds_count", st) == 150
    assert value(after_load, "kuma_append_duration_seconds_bucket", Map.put(st, "le", "+Inf")) == 150
    assert value(after_load, "kuma_append_duration_seconds_sum", st) > 0
    assert value(after_load, "kuma_uptime_seconds", st) > value(before, "kuma_uptime_seconds", st)

    {:ok, positions} = Kuma.position(store)

    for shard <- 0..1 do
      assert value(after_load, "kuma_shard_position", Map.put(st, "shard", "#{shard}")) == Map.get(positions, shard, 0)
    end

    assert value(after_load, "kuma_global_position", st) in 0..300
    projection = Map.put(st, "projection", inspect(:"#{name}_collector"))
    assert value(after_load, "kuma_projection_events_total", projection) == 300
    assert value(after_load, "kuma_projection_lag", projection) == 0
    assert value(after_load, "kuma_native_memory_bytes", %{"kind" => "sqlite"}) > 0
    assert value(after_load, "kuma_beam_memory_bytes", %{"kind" => "total"}) > 0
    assert value(after_load, "process_resident_memory_bytes") > 0
    assert {"gauge", _} = after_load[{"kuma_writer_queue_depth", Map.put(st, "writer", "0")}]
  end

  test "the monitor's JSON, and paths and methods it does not serve", %{store: store} do
    {:ok, 3} = Kuma.append(store, "j", [1, 2, 3])

    {:error, {:partial, _}} =
      Kuma.append_batch(store, [{"b1", [:x, :y]}, {"b2", [:z]}, {"j", [:stale], expected_seq: 0}])

    {200, headers, body} = get(url(store) <> "stats.json")
    assert "content-type: application/json" in headers
    stats = Kuma.JSONTestParser.parse!(body)
    assert stats["totals"]["events"] == 6
    assert stats["totals"]["appends"] == 3
    assert stats["totals"]["append_errors"] == 1
    assert length(stats["shards"]) == 2
    assert stats["mode"] == "single"

    {200, _, page} = get(url(store))
    assert page =~ "<title>Kuma monitor</title>"
    refute page =~ ~r/(src|href)="(https?:)?\/\//, "the page fetches nothing from elsewhere"

    assert {404, _, _} = get(url(store) <> "nope")
    assert {405, _, _} = get(url(store) <> "metrics", "POST")
  end

  @tag store: false
  test "a port in use fails the start cleanly; bad options are refused", %{dir: dir, name: name} do
    {:ok, squatter} = :gen_tcp.listen(0, ip: {127, 0, 0, 1})
    {:ok, port} = :inet.port(squatter)

    assert {:error, {:http, address, :eaddrinuse} = reason} = Kuma.start(name: name, data_dir: dir, http: [port: port])
    assert address == "127.0.0.1:#{port}"
    assert Kuma.format_error(reason) =~ "port is in use"
    assert {:error, {:no_store, ^name}} = Kuma.info(name)
    :gen_tcp.close(squatter)

    for bad <- [[port: -1], [port: "80"], [ip: "not-an-ip"], [ip: {1, 2}], "9568", [prot: 1]] do
      assert {:error, reason} = Kuma.start(name: name, data_dir: dir, http: bad)
      assert match?({:invalid, :http, _}, reason) or match?({:unknown_option, :prot}, reason), inspect(reason)
    end

    # Nothing was left holding the data dir.
    assert {:ok, _} = Kuma.start(name: name, data_dir: dir, http: [port: 0, ip: "127.0.0.1"])
    assert {:ok, %{http: "http://127.0.0.1:" <> _}} = Kuma.info(name)
    Kuma.stop(name)
  end

  @tag store: false
  test "without http: nothing listens and info says so", %{dir: dir, name: name} do
    {:ok, _} = Kuma.start(name: name, data_dir: dir)
    assert {:ok, %{http: nil}} = Kuma.info(name)
    assert {:error, :metrics_off} = Kuma.Metrics.snapshot(name)
  end

  test "latency quantiles interpolate within their bucket" do
    bounds = [100, 1_000, 10_000]
    assert Kuma.HTTP.quantile([0, 0, 0, 0], bounds, 0.5) == nil
    assert Kuma.HTTP.quantile([10, 0, 0, 0], bounds, 0.5) == 0.05
    assert Kuma.HTTP.quantile([0, 10, 0, 0], bounds, 0.99) == 0.991
    assert Kuma.HTTP.quantile([50, 0, 49, 1], bounds, 0.99) == 10.0
    assert Kuma.HTTP.quantile([50, 0, 49, 1], bounds, 0.5) == 0.1
  end

  # -- the page in a real browser ------------------------------------------------------------

  @tag :chromium
  @tag :tmp_dir
  test "the monitor page shows numbers that change while a load runs", %{store: store, tmp_dir: tmp} do
    load =
      Task.async(fn ->
        Stream.iterate(1, &(&1 + 1))
        |> Enum.reduce_while(0, fn i, _ ->
          {:ok, _} = Kuma.append(store, "load-#{rem(i, 50)}", [{:n, i}])

          receive do
            :stop -> {:halt, i}
          after
            0 -> {:cont, i}
          end
        end)
      end)

    # The page shows rates over the server's last one-second sample: wait until there is
    # a sample with one before it (and so a rate) under the load.
    assert eventually(
             fn -> length(Kuma.JSONTestParser.parse!(elem(get(url(store) <> "stats.json"), 2))["history"]) >= 3 end,
             100,
             50
           )

    first = browse(tmp, url(store), "first")
    Process.sleep(1_500)
    second = browse(tmp, url(store), "second")
    screenshot = Path.join(tmp, "monitor.png")
    chromium(tmp, ["--screenshot=#{screenshot}", "--window-size=1280,1000", "--virtual-time-budget=2500", url(store)])
    send(load.pid, :stop)
    Task.await(load, 10_000)

    for dom <- [first, second] do
      assert text(dom, "status") == "live"
      assert String.to_integer(attr_updates(dom)) >= 1
      assert count(dom, "events-per-s") > 0, "events/s under load: #{text(dom, "events-per-s")}"
      assert text(dom, "p99") =~ ~r/\d+(\.\d+)? (ms|µs)/
      assert dom =~ ~r/<tbody id="shards"><tr><td>0<\/td>/
    end

    assert count(second, "total-events") > count(first, "total-events")
    assert <<0x89, "PNG", _::binary>> = File.read!(screenshot)
    IO.puts("\n  monitor screenshot: #{screenshot}")
  end

  defp browse(tmp, url, label) do
    dom = chromium(tmp, ["--dump-dom", "--virtual-time-budget=2500", url])
    File.write!(Path.join(tmp, "#{label}.html"), dom)
    dom
  end

  defp chromium(tmp, args) do
    profile = Path.join(tmp, "profile-#{System.unique_integer([:positive])}")
    exe = System.find_executable("chromium") || System.find_executable("chromium-browser")

    flags = ~w(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
         --disable-component-update --disable-sync --disable-dev-shm-usage) ++ ["--user-data-dir=#{profile}"]

    # Chromium talks a lot on stderr (no D-Bus here): keep it out of the test output.
    {out, 0} = System.cmd("sh", ["-c", "exec \"$0\" \"$@\" 2>/dev/null", exe | flags ++ args])
    out
  end

  defp text(dom, id) do
    case Regex.run(~r/id="#{id}"[^>]*>([^<]*)</, dom) do
      [_, t] -> t
      nil -> flunk("no element ##{id} in the page")
    end
  end

  defp count(dom, id), do: dom |> text(id) |> String.replace(",", "") |> String.to_integer()
  defp attr_updates(dom), do: Regex.run(~r/data-updates="(\d+)"/, dom) |> List.last()
end
