defmodule Kuma.ConcurrencyTest do
  # Promise 2: writes to one entity are totally ordered, whatever the number of writers.
  use Kuma.StoreCase, async: true

  @writers 100
  @appends_per_writer 60
  @entities 1_000

  test "100 concurrent writers over 1,000 entities leave every entity gapless and verified", %{store: store} do
    acks =
      1..@writers
      |> Enum.map(fn w ->
        Task.async(fn ->
          :rand.seed(:exsss, {w, w * 7, w * 13})

          for _ <- 1..@appends_per_writer do
            id = "entity-#{:rand.uniform(@entities)}"
            events = for k <- 1..:rand.uniform(3), do: {:wrote, w, k}
            {:ok, last} = Kuma.append(store, id, events)
            {id, last, length(events)}
          end
        end)
      end)
      |> Enum.flat_map(&Task.await(&1, 60_000))

    written = acks |> Enum.map(&elem(&1, 2)) |> Enum.sum()
    per_entity = Enum.group_by(acks, &elem(&1, 0))

    stored =
      for {id, entity_acks} <- per_entity, reduce: 0 do
        total ->
          {:ok, events} = Kuma.events(store, id)
          n = length(events)
          # Gapless 1..n, n equals what was acknowledged, each ack's last seq is distinct.
          assert Enum.map(events, & &1.seq) == Enum.to_list(1..n)
          assert n == entity_acks |> Enum.map(&elem(&1, 2)) |> Enum.sum()
          lasts = Enum.map(entity_acks, &elem(&1, 1))
          assert Enum.uniq(lasts) == lasts
          assert Enum.max(lasts) == n
          # The events of one append are contiguous in the stream (appends are atomic).
          assert contiguous_appends?(events)
          assert {:ok, %{events: ^n}} = Kuma.verify(store, id)
          total + n
      end

    assert stored == written
    assert {:ok, %{events: ^written}} = Kuma.verify_store(store)
  end

  defp contiguous_appends?(events) do
    events
    |> Enum.map(& &1.data)
    |> Enum.chunk_while(
      [],
      fn {:wrote, w, k} = e, acc ->
        case acc do
          [] when k == 1 -> {:cont, [e]}
          [{:wrote, ^w, prev} | _] when k == prev + 1 -> {:cont, [e | acc]}
          _ when k == 1 -> {:cont, Enum.reverse(acc), [e]}
          _ -> {:cont, :broken, []}
        end
      end,
      fn acc -> {:cont, Enum.reverse(acc), []} end
    )
    |> Enum.all?(&(&1 != :broken))
  end
end
