defmodule Kuma.Test.ClusterWriter do
  @moduledoc """
  Runs on a node of a test cluster: appends to its own entities, one event at a time,
  until stopped, and records every attempt as `{entity_id, value, expected_seq, result}`.
  Every other append is conditional (`expected_seq` = the last seq it knows, when it knows
  one), so conflicts and their refusals are part of the history. Values are unique. After
  every third acknowledged append it reads the entity's head and records `{:read, id,
  acked_seq, seen_seq | error}`: a linearizable read sees at least what was acknowledged.
  """

  @doc "Starts a writer on this node; returns its pid."
  def start(store, prefix, ids, timeout \\ 3_000) do
    spawn(fn -> loop(store, prefix, ids, timeout, 0, %{}, []) end)
  end

  @doc "Stops a writer and returns its history (oldest first)."
  def stop(pid, wait \\ 30_000) do
    ref = make_ref()
    send(pid, {:stop, self(), ref})

    receive do
      {^ref, history} -> history
    after
      wait -> :no_answer
    end
  end

  defp read(store, id, {:ok, acked}) do
    case Kuma.head(store, id) do
      {:ok, %{seq: seen}} -> {:read, id, acked, seen}
      {:ok, nil} -> {:read, id, acked, 0}
      other -> {:read, id, acked, other}
    end
  end

  defp loop(store, prefix, ids, timeout, n, known, history) do
    receive do
      {:stop, from, ref} -> send(from, {ref, Enum.reverse(history)})
    after
      0 ->
        id = Enum.at(ids, rem(n, length(ids)))
        value = {prefix, n}
        expected = if rem(n, 2) == 1, do: Map.get(known, id), else: nil
        opts = if expected, do: [timeout: timeout, expected_seq: expected], else: [timeout: timeout]
        result = Kuma.append(store, id, {:v, value}, opts)

        known =
          case result do
            {:ok, seq} -> Map.put(known, id, seq)
            {:error, {:wrong_expected_seq, _, actual}} -> Map.put(known, id, actual)
            _ -> Map.delete(known, id)
          end

        history = [{id, value, expected, result} | history]
        history = if match?({:ok, _}, result) and rem(n, 3) == 0, do: [read(store, id, result) | history], else: history
        loop(store, prefix, ids, timeout, n + 1, known, history)
    end
  end
end

defmodule Kuma.Test.ClusterProbe do
  @moduledoc "Reads a node's own copy of a shard, bypassing routing (for replica comparisons)."

  require Kuma.Native
  alias Kuma.{Native, Store}

  @doc "A digest of everything stored in `shard` on this node: positions, ids, seqs and chain hashes."
  def digest(store, shard) do
    {:ok, s} = Store.lookup(store)
    rows = read_all(s, shard, 0, [])
    {length(rows), :crypto.hash(:sha256, :erlang.term_to_binary(rows))}
  end

  defp read_all(s, shard, after_pos, acc) do
    {:ok, {events, searched, _}} = Native.read_query(s.native, shard, after_pos, %Kuma.Query{}, 5_000)

    case events do
      [] ->
        Enum.reverse(acc)

      _ ->
        rows =
          for e <- events,
              do:
                {Native.event(e, :position), Native.event(e, :entity_id), Native.event(e, :seq), Native.event(e, :hash)}

        read_all(s, shard, searched, Enum.reverse(rows, acc))
    end
  end

  @doc "Every event of this node's copy of `shard`, decrypted with this node's keys."
  def read_local(store, shard) do
    {:ok, s} = Store.lookup(store)

    with {:ok, {events, _, _}} <- Native.read_query(s.native, shard, 0, %Kuma.Query{}, 100_000) do
      {:ok, length(events)}
    end
  end

  @doc """
  Subscribes to `store` from a process on this node that keeps `{entity_id, seq}` of every
  event it receives; returns its pid (`received/1` asks it).
  """
  def subscriber(store, opts) do
    caller = self()

    pid =
      spawn(fn ->
        {:ok, _} = Kuma.subscribe(store, opts)
        send(caller, {:subscribed, self()})
        collect([])
      end)

    receive do
      {:subscribed, ^pid} -> pid
    after
      30_000 -> raise "no subscription"
    end
  end

  defp collect(acc) do
    receive do
      {:kuma_event, e} -> collect([{e.entity_id, e.seq} | acc])
      {:received, from} -> send(from, {:received, Enum.reverse(acc)}) && collect(acc)
    end
  end

  @doc "What the subscriber `pid` received so far."
  def received(pid) do
    send(pid, {:received, self()})

    receive do
      {:received, list} -> list
    after
      5_000 -> :no_answer
    end
  end

  @doc "Whether the entity's process runs on this node."
  def live?(store, id) do
    {:ok, s} = Store.lookup(store)
    Kuma.Entity.whereis(s, id) != nil
  end

  @doc "The last Raft index this node applied to `shard`."
  def applied(store, shard) do
    {:ok, s} = Store.lookup(store)
    {:ok, index} = Native.cluster_applied_index(s.native, shard)
    index
  end
end
