defmodule Kuma.Upcaster do
  @moduledoc """
  A store-wide upcaster: turns events stored in an old shape into the current shape on
  every read path (entity loads, `Kuma.history/2`, `Kuma.read_at/2`, `Kuma.stream/3`,
  `Kuma.events/3`, `Kuma.read_shard/4`), without rewriting storage.

      defmodule MyApp.Upcasters do
        @behaviour Kuma.Upcaster
        # v1 stored {:credited, amount}; v2 is %Credited{amount: amount}.
        @impl true
        def upcast({:credited, amount}, _envelope) when is_integer(amount), do: %MyApp.Credited{amount: amount}
        def upcast(event, _envelope), do: event
      end

      Kuma.start(data_dir: "data", upcasters: [MyApp.Upcasters])

  Upcasters run in order, each receiving the previous one's result and the event's
  `Kuma.Envelope` (type, seq, timestamp, metadata of the stored event). A 2-arity function
  works too. Aggregates can also upcast their own events (`c:Kuma.Aggregate.upcast/2`);
  store upcasters run first.
  """

  @callback upcast(event :: term(), envelope :: Kuma.Envelope.t()) :: term()
end
