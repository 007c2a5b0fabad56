defmodule Kuma.HTTP do
  @moduledoc """
  The store's HTTP endpoint, started with `Kuma.start(..., http: [port: 9568])` (off by
  default): a small HTTP/1.1 server on `:gen_tcp` (no dependency), bound to 127.0.0.1 unless
  `ip:` says otherwise.

  * `GET /metrics` - every metric of `Kuma.Metrics` in the Prometheus text format
  * `GET /` - the live monitor: one self-contained HTML page (nothing fetched from
    elsewhere) that polls `/stats.json` every second: events/s, append latency p50/p99,
    live entities, per-shard positions and writer queues, projections and their lag,
    memory, uptime, and the cluster's nodes in cluster mode
  * `GET /stats.json` - what the page shows, with the last two minutes of samples

  Options (`http:`): `port:` (default 9568; 0 picks a free one, `Kuma.info/1` says which),
  `ip:` (a tuple or a string such as `"0.0.0.0"`; default `{127, 0, 0, 1}`). There is no
  authentication: expose it beyond the machine only behind something that adds it. No
  entity id, event or key is ever served, only counts.

  Errors from `Kuma.start/1`: `{:http, address, :eaddrinuse}` (the port is taken) and
  other `:gen_tcp.listen/2` reasons; nothing of the store is left running then.
  """

  use GenServer
  require Logger

  alias Kuma.{Metrics, Store}

  @sample_ms 1_000
  @history 120
  @page File.read!(Path.join(__DIR__, "http/monitor.html"))
  @external_resource Path.join(__DIR__, "http/monitor.html")

  @doc false
  def child_spec(config), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [config]}, shutdown: 2_000}

  @doc false
  def start_link(config), do: GenServer.start_link(__MODULE__, config, name: Store.via(config.name, :http))

  @doc false
  # Validates the `http:` option: `{:ok, nil | %{port, ip}}`.
  @spec options(term()) :: {:ok, nil | %{port: :inet.port_number(), ip: :inet.ip_address()}} | {:error, term()}
  def options(nil), do: {:ok, nil}
  def options(false), do: {:ok, nil}
  def options(true), do: options([])

  def options(opts) when is_list(opts) do
    with :ok <- Kuma.Validate.keys(opts, [:port, :ip]),
         {:ok, port} <- port(Keyword.get(opts, :port, 9568)),
         {:ok, ip} <- ip(Keyword.get(opts, :ip, {127, 0, 0, 1})) do
      {:ok, %{port: port, ip: ip}}
    end
  end

  def options(_), do: {:error, {:invalid, :http, "must be a keyword list such as [port: 9568]"}}

  defp port(p) when is_integer(p) and p in 0..65_535, do: {:ok, p}
  defp port(_), do: {:error, {:invalid, :http, "port must be an integer in 0..65535"}}

  defp ip(ip) when is_tuple(ip) do
    if :inet.is_ip_address(ip), do: {:ok, ip}, else: {:error, {:invalid, :http, "ip must be an address"}}
  end

  defp ip(ip) when is_binary(ip) do
    case :inet.parse_address(String.to_charlist(ip)) do
      {:ok, addr} -> {:ok, addr}
      {:error, _} -> {:error, {:invalid, :http, "ip #{inspect(ip)} is not an address"}}
    end
  end

  defp ip(_), do: {:error, {:invalid, :http, "ip must be a tuple or a string"}}

  @doc "The URL the store's endpoint serves, or nil if it has none."
  @spec url(Kuma.store()) :: String.t() | nil
  def url(store) do
    with {:ok, s} <- Store.lookup(store),
         [{pid, _}] <- Registry.lookup(Kuma.Registry, {s.name, :http}) do
      GenServer.call(pid, :url)
    else
      _ -> nil
    end
  catch
    :exit, _ -> nil
  end

  # -- the server ------------------------------------------------------------------------

  @impl true
  def init(config) do
    %{port: port, ip: ip} = config.http
    family = if tuple_size(ip) == 8, do: :inet6, else: :inet
    listen = [:binary, family, packet: :http_bin, active: false, reuseaddr: true, ip: ip, backlog: 128]

    case :gen_tcp.listen(port, listen) do
      {:ok, socket} ->
        Metrics.enable(config.name)
        {:ok, {_, bound}} = :inet.sockname(socket)
        server = self()
        acceptor = spawn_link(fn -> accept(socket, server, config.name) end)
        :timer.send_interval(@sample_ms, :sample)
        url = "http://#{format_ip(ip)}:#{bound}/"
        {:ok, %{store: config.name, socket: socket, acceptor: acceptor, url: url, last: nil, history: [], now: nil}}

      {:error, reason} ->
        {:stop, {:http, "#{format_ip(ip)}:#{port}", reason}}
    end
  end

  @impl true
  def handle_call(:url, _from, st), do: {:reply, st.url, st}
  def handle_call(:stats, _from, st), do: {:reply, stats(st), st}

  @impl true
  def handle_info(:sample, st) do
    case Metrics.snapshot(st.store) do
      {:ok, snap} -> {:noreply, sample(st, snap)}
      _ -> {:noreply, st}
    end
  end

  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def terminate(_reason, st) do
    Metrics.disable(st.store)
    :gen_tcp.close(st.socket)
    :ok
  end

  # Rates over the last sampling interval, and the latency quantiles of the appends in it.
  defp sample(st, snap) do
    t = System.monotonic_time(:millisecond)

    now =
      case st.last do
        nil ->
          %{t: t, events_per_s: 0.0, appends_per_s: 0.0, bytes_per_s: 0.0, p50_ms: nil, p99_ms: nil}

        {t0, prev} ->
          dt = max(t - t0, 1) / 1000
          c = snap.counters
          p = prev.counters
          deltas = Enum.zip_with(snap.append_latency.counts, prev.append_latency.counts, &-/2)

          %{
            t: t,
            events_per_s: (c.events - p.events) / dt,
            appends_per_s: (c.appends - p.appends) / dt,
            bytes_per_s: (c.bytes - p.bytes) / dt,
            p50_ms: quantile(deltas, snap.append_latency.bounds_us, 0.5),
            p99_ms: quantile(deltas, snap.append_latency.bounds_us, 0.99)
          }
      end

    history = Enum.take([%{events_per_s: now.events_per_s, p99_ms: now.p99_ms} | st.history], @history)
    %{st | last: {t, snap}, now: now, history: history}
  end

  @doc false
  # The q-quantile in ms of a histogram (`counts` per bucket, `bounds` in µs, then +Inf),
  # interpolated within its bucket; nil without observations.
  @spec quantile([non_neg_integer()], [pos_integer()], float()) :: float() | nil
  def quantile(counts, bounds, q) do
    total = Enum.sum(counts)

    if total == 0 do
      nil
    else
      target = q * total
      edges = Enum.zip([0 | bounds], bounds ++ [List.last(bounds)])

      counts
      |> Enum.zip(edges)
      |> Enum.reduce_while(0, fn {n, {lo, hi}}, seen ->
        if n > 0 and seen + n >= target,
          do: {:halt, {:found, (lo + (hi - lo) * (target - seen) / n) / 1000}},
          else: {:cont, seen + n}
      end)
      |> case do
        {:found, ms} -> Float.round(ms, 3)
        _ -> List.last(bounds) / 1000
      end
    end
  end

  defp stats(%{last: nil} = st) do
    case Metrics.snapshot(st.store) do
      {:ok, snap} -> stats(sample(st, snap))
      {:error, reason} -> %{error: inspect(reason)}
    end
  end

  defp stats(%{last: {_, snap}, now: now, history: history}) do
    %{
      store: inspect(snap.store),
      store_id: snap.store_id,
      mode: snap.mode,
      node: node(),
      uptime_seconds: snap.uptime_seconds,
      now: Map.delete(now, :t),
      totals:
        Map.take(snap.counters, [:appends, :append_errors, :events, :bytes, :executes, :loads, :passivations, :erasures]),
      entities_live: snap.entities_live,
      global_position: snap.global_position,
      shards: for(sh <- snap.shards, do: Map.put(sh, :queue, Enum.at(snap.writer_queues, sh.writer || 0))),
      projections: snap.projections,
      memory: %{
        beam_total: snap.memory.beam.total,
        processes: snap.memory.beam.processes,
        binary: snap.memory.beam.binary,
        ets: snap.memory.beam.ets,
        native_sqlite: snap.memory.native.sqlite,
        native_tail: snap.memory.native.tail,
        resident: snap.memory.resident
      },
      cluster: snap.cluster,
      history: Enum.reverse(history)
    }
  end

  # -- connections -------------------------------------------------------------------------

  defp accept(socket, server, store) do
    case :gen_tcp.accept(socket) do
      {:ok, conn} ->
        pid = spawn(fn -> serve(conn, server, store) end)
        _ = :gen_tcp.controlling_process(conn, pid)
        send(pid, :go)
        accept(socket, server, store)

      {:error, :closed} ->
        :ok

      {:error, reason} ->
        Logger.warning("Kuma.HTTP: accept failed: #{inspect(reason)}")
        Process.sleep(100)
        accept(socket, server, store)
    end
  end

  defp serve(conn, server, store) do
    receive do
      :go -> :ok
    after
      5_000 -> :ok
    end

    with {:ok, {:http_request, method, {:abs_path, path}, _version}} <- :gen_tcp.recv(conn, 0, 5_000),
         :ok <- skip_headers(conn) do
      respond(conn, route(method, path |> String.split("?") |> hd(), server, store))
    else
      {:ok, {:http_error, _}} -> respond(conn, {400, "text/plain", "bad request\n"})
      _ -> :ok
    end

    :gen_tcp.close(conn)
  end

  defp skip_headers(conn) do
    case :gen_tcp.recv(conn, 0, 5_000) do
      {:ok, :http_eoh} -> :ok
      {:ok, {:http_header, _, _, _, _}} -> skip_headers(conn)
      other -> other
    end
  end

  defp route(:GET, "/metrics", _server, store) do
    case Metrics.snapshot(store) do
      {:ok, snap} -> {200, "text/plain; version=0.0.4; charset=utf-8", Metrics.prometheus(snap)}
      {:error, reason} -> {503, "text/plain", "metrics unavailable: #{inspect(reason)}\n"}
    end
  end

  defp route(:GET, "/stats.json", server, _store) do
    {200, "application/json", Kuma.JSON.encode_iodata(GenServer.call(server, :stats))}
  catch
    :exit, _ -> {503, "text/plain", "the store is stopping\n"}
  end

  defp route(:GET, "/", _server, _store), do: {200, "text/html; charset=utf-8", @page}
  defp route(:GET, _path, _server, _store), do: {404, "text/plain", "not found: try /, /metrics or /stats.json\n"}
  defp route(_method, _path, _server, _store), do: {405, "text/plain", "only GET\n"}

  defp respond(conn, {status, type, body}) do
    body = IO.iodata_to_binary(body)

    head = [
      "HTTP/1.1 #{status} #{reason(status)}\r\n",
      "content-type: #{type}\r\n",
      "content-length: #{byte_size(body)}\r\n",
      "cache-control: no-store\r\n",
      "x-content-type-options: nosniff\r\n",
      "content-security-policy: default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'\r\n",
      "connection: close\r\n\r\n"
    ]

    :gen_tcp.send(conn, [head, body])
  end

  defp reason(200), do: "OK"
  defp reason(400), do: "Bad Request"
  defp reason(404), do: "Not Found"
  defp reason(405), do: "Method Not Allowed"
  defp reason(503), do: "Service Unavailable"

  defp format_ip(ip) when tuple_size(ip) == 8, do: "[#{:inet.ntoa(ip)}]"
  defp format_ip(ip), do: to_string(:inet.ntoa(ip))
end
