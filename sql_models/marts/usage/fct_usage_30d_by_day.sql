-- Rolling 30-day usage per customer, meter and dimension, ending with (and including) each UTC day.
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, customer_id, meter_id, dimension]
lookback_days: 29
*/
with daily as (
    select * from fct_usage_by_day
    where day >= $lookback_start_date::date and day < $end_date::date
),

final as (
    select
        $start_date::date as day,
        customer_id,
        meter_id,
        dimension,
        any_value(kind) as kind,
        sum(usage)::decimal(38, 9) as usage,
        sum(gauge_integral)::decimal(38, 9) as gauge_integral,
        sum(gauge_covered_ms)::bigint as gauge_covered_ms,
        max(gauge_peak)::decimal(38, 9) as gauge_peak,
        count(*)::bigint as days_with_data,
        sum(samples)::bigint as samples,
        sum(resets)::bigint as resets
    from daily
    group by customer_id, meter_id, dimension
)

select * from final
