-- Rolling 30-day usage per customer, meter and dimension, ending with (and including) each UTC day.
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, customer_id, meter_id, dimension]
lookback_days: 29
range_query: true
*/
-- range_query: every day d of [$start_date, $end_date) in one query, each from its own 30 days
with days as (
    select
        range::date as check_day,
        (range::date - ($start_date::date - $lookback_start_date::date)::integer)::date as lookback_start
    from range($start_date::date, $end_date::date, interval 1 day)
),

all_daily as (
    select * from fct_usage_by_day
    where day >= $lookback_start_date::date and day < $end_date::date
),

daily as (
    select
        days.check_day,
        all_daily.*
    from days
    inner join all_daily
        on days.lookback_start <= all_daily.day and days.check_day >= all_daily.day
),

final as (
    select
        check_day as day,
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
    group by check_day, customer_id, meter_id, dimension
)

select * from final
