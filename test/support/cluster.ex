defmodule Kuma.Test.Cluster do
  @moduledoc """
  A cluster of real BEAM nodes on this machine for tests: each node is an OS process
  started with OTP's `:peer`, controlled over its standard I/O (`connection: :standard_io`),
  so the test VM is not part of the nodes' Erlang distribution and cannot bridge a
  partition between them. Each node runs a Kuma store in cluster mode with its own data
  dir; the nodes find each other through epmd on loopback.

  Faults: `kill9/2` (SIGKILL of the node's OS process), `pause/2` and `resume/2` (SIGSTOP,
  SIGCONT), `partition/2` and `heal/1` (a node changes its cookie and drops its
  connections, so it cannot reach the others nor they it), `restart/2` (a new OS process
  with the same name and data dir).
  """

  defstruct [:base, :tag, :store, :names, :opts, load: [], nodes: %{}]

  @cookie ~c"kuma_cluster_test"

  @doc """
  Starts `n` nodes and a store named `store` on each (`store_opts` added to every start).
  `load` is `[{module, beam_binary}]` to load on every node first: modules that exist in
  this VM's memory only (compiled from a script, as by the benchmarks), this module
  among them when it was.
  """
  def start(n, store, store_opts \\ [], load \\ []) do
    tag = System.unique_integer([:positive])
    base = Path.join(System.tmp_dir!(), "kuma_cluster_#{System.pid()}_#{tag}")
    names = for i <- 1..n, do: :"k#{tag}n#{i}"
    c = %__MODULE__{base: base, tag: tag, store: store, names: names, opts: store_opts, load: load}
    c = Enum.reduce(names, c, fn name, c -> boot(c, name) end)
    seeds = Enum.map(names, &node_of(c, &1))
    cluster = Keyword.merge([seeds: seeds, replicas: min(3, n)], Keyword.get(store_opts, :cluster, []))
    c = %{c | opts: Keyword.put(store_opts, :cluster, cluster)}
    started = parallel(names, fn name -> start_store(c, name) end)

    case Enum.find(started, &(not match?({:ok, _}, &1))) do
      nil -> {:ok, c}
      error -> {:error, error, c}
    end
  end

  defp boot(c, name) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
    # Several VMs share this machine's cores: schedulers that spin while idle would take
    # the CPU from the others (+sbwt none: sleep at once instead).
    no_spin = [~c"+sbwt", ~c"none", ~c"+sbwtdcpu", ~c"none", ~c"+sbwtdio", ~c"none"]
    args = paths ++ no_spin ++ [~c"-setcookie", @cookie, ~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false"]

    {:ok, pid, node} =
      :peer.start(%{name: name, host: ~c"localhost", connection: :standard_io, args: args, wait_boot: 60_000})

    for {module, binary} <- c.load,
        do: {:module, _} = :peer.call(pid, :code, :load_binary, [module, ~c"nofile", binary])

    {:ok, _} = :peer.call(pid, Application, :ensure_all_started, [:kuma], 60_000)
    :peer.call(pid, __MODULE__, :quiet, [])
    os_pid = :peer.call(pid, System, :pid, [])
    %{c | nodes: Map.put(c.nodes, name, %{peer: pid, node: node, os_pid: os_pid})}
  end

  @doc false
  # On each node: errors only (ra warns of every leader it loses, which the fault tests
  # provoke by the hundred), and not the refused connection attempts that a
  # partition (other cookies) makes the kernel log.
  def quiet do
    Logger.configure(level: :error)
    :logger.add_primary_filter(:kuma_test_partition_noise, {&__MODULE__.drop_auth_noise/2, nil})
    :ok
  end

  @doc false
  def drop_auth_noise(%{msg: msg} = event, _) do
    text =
      case msg do
        {:string, s} -> IO.chardata_to_string(s)
        {:report, %{format: format, args: args}} -> :io_lib.format(format, args) |> IO.chardata_to_string()
        {:report, _} -> ""
        {format, args} when is_list(args) -> :io_lib.format(format, args) |> IO.chardata_to_string()
      end

    # And a restarted node (same name) being sent replies meant for its previous incarnation.
    if text =~ "Connection attempt from node" or text =~ "old incarnation", do: :stop, else: event
  rescue
    _ -> event
  end

  @doc """
  Starts one more node (not a seed) and its store, with the options of the others: it
  joins the cluster. Returns `{start_store_result, name, c}`.
  """
  def add_node(c) do
    name = :"k#{c.tag}n#{length(c.names) + 1}"
    c = boot(%{c | names: c.names ++ [name]}, name)
    {start_store(c, name), name, c}
  end

  @doc "Starts (or starts again) the store on node `name`."
  def start_store(c, name, extra \\ []) do
    opts = Keyword.merge([name: c.store, data_dir: data_dir(c, name), shards: 4], c.opts) |> Keyword.merge(extra)
    call(c, name, Kuma, :start, [opts], 90_000)
  end

  def data_dir(c, name), do: Path.join(c.base, Atom.to_string(name))
  def node_of(c, name), do: c.nodes[name].node
  def names(c), do: c.names

  @doc "Runs `m.f(a)` on node `name`; a node that is down gives `{:peer_down, reason}`."
  def call(c, name, m, f, a, timeout \\ 30_000) do
    :peer.call(c.nodes[name].peer, m, f, a, timeout)
  catch
    :exit, reason -> {:peer_down, reason}
  end

  @doc "SIGKILL: the node's OS process dies at once, as in a crash."
  def kill9(c, name) do
    {_, 0} = System.cmd("kill", ["-9", c.nodes[name].os_pid])
    wait_dead(c.nodes[name].peer)
    c
  end

  defp wait_dead(peer) do
    ref = Process.monitor(peer)

    receive do
      {:DOWN, ^ref, _, _, _} -> :ok
    after
      10_000 -> :ok
    end
  end

  @doc "SIGSTOP: the node stops (every process of it), as under a long GC pause or a VM freeze."
  def pause(c, name), do: signal(c, name, "-STOP")
  @doc "SIGCONT."
  def resume(c, name), do: signal(c, name, "-CONT")

  defp signal(c, name, sig) do
    {_, 0} = System.cmd("kill", [sig, c.nodes[name].os_pid])
    c
  end

  @doc "A new OS process for a node that died, with the same name and data dir, and its store."
  def restart(c, name) do
    c = boot(c, name)
    {start_store(c, name), c}
  end

  @doc """
  New OS processes for several nodes that died, and their stores started side by side
  (each waits for a majority of the metadata group, which may be among them).
  """
  def restart_all(c, names) do
    c = Enum.reduce(names, c, &boot(&2, &1))
    {parallel(names, &start_store(c, &1)), c}
  end

  @doc """
  Cuts node `name` off from every other node: it takes another cookie and drops its
  connections, so neither side can reach the other until `heal/2`.
  """
  def partition(c, name) do
    others = for n <- c.names, n != name, do: node_of(c, n)
    call(c, name, __MODULE__, :isolate, [others])
    for n <- c.names, n != name, do: call(c, n, Node, :disconnect, [node_of(c, name)])
    c
  end

  @doc false
  # On the node being cut off.
  def isolate(others) do
    :erlang.set_cookie(node(), :kuma_partitioned)
    for o <- others, do: :erlang.set_cookie(o, :kuma_partitioned)
    for o <- others, do: Node.disconnect(o)
    :ok
  end

  @doc "Ends a partition of node `name`."
  def heal(c, name) do
    others = for n <- c.names, n != name, do: node_of(c, n)
    call(c, name, __MODULE__, :rejoin, [others, @cookie])
    c
  end

  @doc false
  def rejoin(others, cookie) do
    :erlang.set_cookie(node(), List.to_atom(cookie))
    for o <- others, do: :erlang.set_cookie(o, List.to_atom(cookie))
    for o <- others, do: Node.connect(o)
    :ok
  end

  @doc "Stops every node and deletes the data dirs."
  def stop(%__MODULE__{} = c) do
    for {_name, n} <- c.nodes do
      try do
        :peer.stop(n.peer)
      catch
        :exit, _ -> :ok
      end

      System.cmd("kill", ["-9", n.os_pid], stderr_to_stdout: true)
    end

    File.rm_rf!(c.base)
    :ok
  end

  @doc "Runs `fun` for every element in parallel; the results in order."
  def parallel(list, fun), do: list |> Enum.map(&Task.async(fn -> fun.(&1) end)) |> Task.await_many(180_000)
end
