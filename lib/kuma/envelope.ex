defmodule Kuma.Envelope do
  @moduledoc """
  A stored event with everything Kuma knows about it.

  * `entity_id` - the entity's id (binary)
  * `seq` - its sequence in the entity's stream: 1, 2, 3, ... without gaps
  * `position` - its global position in its shard, assigned in commit order
  * `shard` - the shard that stores the entity
  * `type` - the event type (see `Kuma.Codec`)
  * `timestamp` - commit time in microseconds since the Unix epoch; never decreases within an
    entity (use `DateTime.from_unix!(ts, :microsecond)`)
  * `metadata` - the map given with the append (`%{}` if none)
  * `data` - the event term as appended
  * `hash` - the 32-byte BLAKE3 chain hash (see docs/storage-format.md)
  * `global` - its position in the store-wide order (`Kuma.read_all/2`), when read in that
    order; `nil` otherwise

  An event's stable identity is `{entity_id, seq}`; `event_id/1` gives it as a UUID, for
  frameworks that want one per event.
  """

  @enforce_keys [:entity_id, :seq, :position, :shard, :type, :timestamp, :metadata, :data, :hash]
  defstruct @enforce_keys ++ [global: nil]

  @type t :: %__MODULE__{
          entity_id: binary(),
          seq: pos_integer(),
          position: pos_integer(),
          shard: non_neg_integer(),
          type: String.t(),
          timestamp: integer(),
          metadata: map(),
          data: term(),
          hash: <<_::256>>,
          global: pos_integer() | nil
        }

  @doc """
  A stable id for the event, as a UUID string (version 8, RFC 9562): the first 122 bits of
  its chain hash. The chain hash covers the entity id, the seq, the timestamp and the
  stored bytes, and never changes, so the id is the same on every read, in exports and
  after restarts, and distinct for distinct events.

      iex> e = %Kuma.Envelope{entity_id: "a", seq: 1, position: 1, shard: 0, type: "", timestamp: 0,
      ...>   metadata: %{}, data: nil, hash: :binary.copy(<<0xAB>>, 32)}
      iex> Kuma.Envelope.event_id(e)
      "abababab-abab-8bab-abab-abababababab"
  """
  @spec event_id(t()) :: String.t()
  def event_id(%__MODULE__{hash: <<a::48, _::4, b::12, _::2, c::62, _::binary>>}) do
    <<u::128>> = <<a::48, 8::4, b::12, 2::2, c::62>>
    hex = u |> Integer.to_string(16) |> String.downcase() |> String.pad_leading(32, "0")
    <<p1::binary-8, p2::binary-4, p3::binary-4, p4::binary-4, p5::binary-12>> = hex
    Enum.join([p1, p2, p3, p4, p5], "-")
  end
end
