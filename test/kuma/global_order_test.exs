defmodule Kuma.GlobalOrderTest do
  # The store-wide order (Kuma.read_all/2, stream_all/2, global_position/1): concurrent
  # writes over many shards read back in one gapless order, with no event skipped or
  # repeated, also across kill -9 of the VM; bad input refused.
  use Kuma.StoreCase, async: false

  alias Kuma.Test.ChildVM

  @moduletag timeout: 120_000

  defp wait_global(store, n) do
    assert eventually(fn -> match?({:ok, m} when m >= n, Kuma.global_position(store)) end, 500, 10)
  end

  # Every event in the order, read page by page.
  defp read_everything(store, limit, after_pos \\ 0, acc \\ []) do
    {:ok, page, searched} = Kuma.read_all(store, after: after_pos, limit: limit)
    assert Enum.all?(page, &(&1.global > after_pos and &1.global <= searched))
    acc = Enum.reverse(page, acc)
    if searched == after_pos, do: Enum.reverse(acc), else: read_everything(store, limit, searched, acc)
  end

  defp check_order(envelopes, n) do
    assert Enum.map(envelopes, & &1.global) == Enum.to_list(1..n)

    for {_id, events} <- Enum.group_by(envelopes, & &1.entity_id) do
      assert Enum.map(events, & &1.seq) == Enum.to_list(1..length(events))
    end
  end

  @tag store_opts: [shards: 16, aggregates: [Bank.Account]]
  test "concurrent writers over 16 shards: one gapless order, every acknowledged event once", %{store: store} do
    acks =
      1..24
      |> Enum.map(fn w ->
        Task.async(fn ->
          for i <- 1..40 do
            id = "g-#{rem(w * 7 + i, 60)}"
            events = for k <- 1..(rem(i, 3) + 1), do: {:wrote, w, i, k}
            {:ok, last} = Kuma.append(store, id, events)
            {id, last}
          end
        end)
      end)
      |> Enum.flat_map(&Task.await(&1, 60_000))

    # Writes through entity processes (pipelined when they wait) go into the order too.
    account = Kuma.entity(store, Bank.Account, "acct-g")
    for _ <- 1..30, do: {:ok, _} = Kuma.execute(account, {:deposit, 1})

    total = Enum.sum(for {id, _} <- Enum.uniq_by(acks, &elem(&1, 0)), do: length(elem(Kuma.events(store, id), 1))) + 30
    wait_global(store, total)
    assert {:ok, ^total} = Kuma.global_position(store)

    for limit <- [1, 13, 10_000] do
      all = read_everything(store, limit)
      check_order(all, total)

      for {id, last} <- acks do
        assert Enum.any?(all, &(&1.entity_id == id and &1.seq == last))
      end
    end

    streamed = store |> Kuma.stream_all(chunk: 64) |> Enum.to_list()
    check_order(streamed, total)
    assert Enum.map(Kuma.stream_all(store, after: total - 5), & &1.global) == Enum.to_list((total - 4)..total)
  end

  test "a write acknowledged before the next began comes first, whatever the shards", %{store: store} do
    ids = for i <- 1..30, do: "seq-#{i}"
    for id <- ids, do: {:ok, 1} = Kuma.append(store, id, {:one, id})
    wait_global(store, 30)
    {:ok, all, 30} = Kuma.read_all(store, limit: 100)
    assert Enum.map(all, & &1.entity_id) == ids
    assert Enum.map(all, & &1.data) == for(id <- ids, do: {:one, id})
  end

  defp receive_all(n, acc \\ []) do
    if n == 0 do
      Enum.reverse(acc)
    else
      receive do
        {:kuma_event, e} -> receive_all(n - 1, [e | acc])
        {:kuma_lagged, _} -> receive_all(n, acc)
      after
        5_000 -> Enum.reverse(acc)
      end
    end
  end

  test "a subscription in the global order: history from a position, then live, each event once", %{store: store} do
    for i <- 1..20, do: {:ok, _} = Kuma.append(store, "h-#{rem(i, 6)}", {:old, i})
    wait_global(store, 20)
    {:ok, _sub} = Kuma.subscribe(store, order: :global, from: 5, max_queue: 7)

    writers =
      for w <- 1..4 do
        Task.async(fn -> for i <- 1..25, do: {:ok, _} = Kuma.append(store, "live-#{w}-#{rem(i, 3)}", {:new, w, i}) end)
      end

    Task.await_many(writers, 30_000)
    got = receive_all(115)
    assert Enum.map(got, & &1.global) == Enum.to_list(6..120)
    refute_receive {:kuma_event, _}, 200
    {:ok, all, 120} = Kuma.read_all(store, after: 5, limit: 1_000)
    assert Enum.map(got, &{&1.entity_id, &1.seq}) == Enum.map(all, &{&1.entity_id, &1.seq})

    # From now: only what comes next.
    {:ok, _} = Kuma.subscribe(store, order: :global)
    {:ok, _} = Kuma.append(store, "next", {:n, 1})
    assert [%{entity_id: "next", global: 121}, %{entity_id: "next", global: 121}] = receive_all(2)
  end

  test "a global subscription refuses a start past the end, filters and an unknown order", %{store: store} do
    {:ok, 1} = Kuma.append(store, "x", {:a, 1})
    wait_global(store, 1)
    assert {:error, {:invalid, :from, _}} = Kuma.subscribe(store, order: :global, from: 2)
    assert {:error, {:invalid, :from, _}} = Kuma.subscribe(store, order: :global, from: :yesterday)
    assert {:error, {:unknown_option, :types}} = Kuma.subscribe(store, order: :global, types: ["a"])
    assert {:error, {:invalid, :order, _}} = Kuma.subscribe(store, order: :bogus)
    assert {:error, {:invalid, :max_queue, _}} = Kuma.subscribe(store, order: :global, max_queue: 0)
  end

  test "bad input: a position past the end, a bad limit, an unknown option", %{store: store} do
    {:ok, 2} = Kuma.append(store, "x", [{:a, 1}, {:a, 2}])
    wait_global(store, 2)
    assert {:error, {:invalid, :after, why}} = Kuma.read_all(store, after: 3)
    assert why =~ "past the end"
    assert {:error, {:invalid, :after, _}} = Kuma.read_all(store, after: -1)
    assert {:error, {:invalid, :limit, _}} = Kuma.read_all(store, limit: 0)
    assert {:error, {:invalid, :limit, _}} = Kuma.read_all(store, limit: 10_001)
    assert {:error, {:unknown_option, :from}} = Kuma.read_all(store, from: 1)
    assert {:ok, [], 2} = Kuma.read_all(store, after: 2)
  end

  @tag store_opts: [global_order: false]
  test "a store started without the order says so", %{store: store, dir: dir} do
    {:ok, 1} = Kuma.append(store, "x", {:a, 1})
    assert {:error, {:invalid, :global_order, _}} = Kuma.global_position(store)
    assert {:error, {:invalid, :global_order, _}} = Kuma.read_all(store)
    refute File.exists?(Path.join(dir, "order.kuma"))
  end

  @tag store: false
  test "global_order must be a boolean", %{dir: dir, name: name} do
    assert {:error, {:invalid, :global_order, _}} = Kuma.start(name: name, data_dir: dir, global_order: :yes)
  end

  # A separate BEAM: 6 writers append to entities of 8 shards and print "ACK id seq"; a
  # reader prints "SEEN global id seq" for what the order showed it.
  @child_script ~S"""
  [dir] = System.argv()
  {:ok, _} = Application.ensure_all_started(:kuma)
  {:ok, store} = Kuma.start(name: :order_crash, data_dir: dir, shards: 8)
  IO.puts("PID #{System.pid()}")

  for w <- 1..6 do
    spawn(fn ->
      Stream.iterate(0, &(&1 + 1))
      |> Enum.each(fn i ->
        id = "o-#{rem(i * 6 + w, 90)}"
        {:ok, seq} = Kuma.append(store, id, [{:w, w, i}])
        IO.puts("ACK #{id} #{seq}")
      end)
    end)
  end

  spawn(fn ->
    Stream.iterate(0, & &1)
    |> Enum.reduce(0, fn _, after_pos ->
      {:ok, page, searched} = Kuma.read_all(store, after: after_pos, limit: 200)
      for e <- page, do: IO.puts("SEEN #{e.global} #{e.entity_id} #{e.seq}")
      Process.sleep(5)
      searched
    end)
  end)

  Process.sleep(:infinity)
  """

  @tag store: false
  test "kill -9 while writing and reading: after restart the order is gapless, holds every acknowledged event once, and what was seen keeps its number",
       %{dir: dir, name: name} do
    {port, os_pid} = ChildVM.start(@child_script, [dir])

    lines =
      ChildVM.collect(
        port,
        %{acks: %{}, seen: %{}},
        &record/2,
        &(map_size(&1.seen) >= 1_500 and map_size(&1.acks) >= 80)
      )

    ChildVM.kill(os_pid)
    lines = ChildVM.drain(port, lines, &record/2)
    assert map_size(lines.seen) > 100, "the child's reader saw too little: #{map_size(lines.seen)}"

    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 8)
    {:ok, n} = Kuma.global_position(store)
    IO.puts("order kill -9: #{map_size(lines.seen)} global positions seen before, #{n} in the order after restart")
    all = read_everything(store, 500)
    check_order(all, n)
    by_global = Map.new(all, &{&1.global, {&1.entity_id, &1.seq}})

    for {id, acked} <- lines.acks do
      stored = for e <- all, e.entity_id == id, do: e.seq
      assert Enum.max(stored) >= acked, "#{id}: acknowledged #{acked}, the order holds #{inspect(stored)}"
    end

    for {global, id_seq} <- lines.seen do
      assert by_global[global] == id_seq, "global #{global} was #{inspect(id_seq)} before the kill"
    end

    # Every event of every shard is in the order (recovered commits numbered at the open).
    assert n ==
             Enum.sum(for id <- Enum.uniq(Enum.map(all, & &1.entity_id)), do: length(elem(Kuma.events(store, id), 1)))
  end

  defp record("ACK " <> rest, lines) do
    [id, seq] = String.split(rest, " ")
    %{lines | acks: Map.update(lines.acks, id, String.to_integer(seq), &max(&1, String.to_integer(seq)))}
  end

  defp record("SEEN " <> rest, lines) do
    [global, id, seq] = String.split(rest, " ")
    %{lines | seen: Map.put(lines.seen, String.to_integer(global), {id, String.to_integer(seq)})}
  end

  defp record(_line, lines), do: lines
end
