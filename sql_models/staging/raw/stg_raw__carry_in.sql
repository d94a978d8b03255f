-- Each series' last sample before the partition's day, recorded by that day's own ingest, renamed and cast.
/* config
materialized: view
*/
with source as (
    select * from raw_carry_in
),

final as (
    select
        series_id::bigint as series_id,
        ts::bigint as ts_ms,
        value::double as value
    from source
)

select * from final
