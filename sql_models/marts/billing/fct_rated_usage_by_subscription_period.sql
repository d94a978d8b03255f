-- Usage priced per customer, subscription period and price row: billing-unit quantity, allowance, tiers, exact amount in minor units.
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id, period_start, meter_id, dimension]
*/
with billable_usage as (
    select * from fct_billable_usage_by_subscription_period
    where month >= $start_date::date and month < $end_date::date
),

periods as (
    select * from dim_subscription_periods_by_month
    where month >= $start_date::date and month < $end_date::date
),

prices as (
    select * from stg_seeds__prices
),

tiers as (
    select * from stg_seeds__price_tiers
),

meters as (
    select * from stg_seeds__meters
),

units as (
    select * from stg_seeds__units
),

period_prices as (
    select
        periods.customer_id,
        periods.period_start,
        periods.period_end,
        periods.period_days,
        periods.month_days,
        periods.currency,
        periods.plan_id,
        periods.plan_version,
        periods.minor_per_major,
        prices.meter_id,
        prices.dimension,
        prices.included_quantity,
        prices.included_pool,
        prices.pricing,
        prices.unit_price,
        prices.package_size,
        prices.package_rounding,
        prices.price_description,
        prices.price_line,
        meters.aggregation,
        meters.billing_unit,
        units.divisor
    from periods
    inner join prices
        on periods.plan_id = prices.plan_id
        and periods.plan_version = prices.plan_version
    inner join meters
        on prices.meter_id = meters.meter_id
    inner join units
        on meters.unit = units.unit
        and meters.billing_unit = units.billing_unit
),

-- the billable quantity in base units x 1e9 (the meter's aggregation, applied once upstream)
usage_quantities as (
    select
        customer_id,
        period_start,
        meter_id,
        dimension,
        to_nano(base_quantity) as quantity_nano
    from billable_usage
),

-- a price row with an empty dimension prices the meter's usage over all dimensions
matched as (
    select
        period_prices.customer_id,
        period_prices.period_start,
        period_prices.meter_id,
        period_prices.dimension,
        any_value(period_prices.period_end) as period_end,
        any_value(period_prices.period_days) as period_days,
        any_value(period_prices.month_days) as month_days,
        any_value(period_prices.currency) as currency,
        any_value(period_prices.plan_id) as plan_id,
        any_value(period_prices.plan_version) as plan_version,
        any_value(period_prices.included_quantity) as included_quantity,
        any_value(period_prices.included_pool) as included_pool,
        any_value(period_prices.pricing) as pricing,
        any_value(period_prices.unit_price) as unit_price,
        any_value(period_prices.package_size) as package_size,
        any_value(period_prices.package_rounding) as package_rounding,
        any_value(period_prices.price_description) as price_description,
        any_value(period_prices.price_line) as price_line,
        any_value(period_prices.aggregation) as aggregation,
        any_value(period_prices.billing_unit) as billing_unit,
        any_value(period_prices.divisor) as divisor,
        any_value(period_prices.minor_per_major) as minor_per_major,
        coalesce(sum(usage_quantities.quantity_nano), 0)::hugeint as quantity_nano
    from period_prices
    left join usage_quantities
        on period_prices.customer_id = usage_quantities.customer_id
        and period_prices.period_start = usage_quantities.period_start
        and period_prices.meter_id = usage_quantities.meter_id
        and (period_prices.dimension = '' or period_prices.dimension = usage_quantities.dimension)
    group by period_prices.customer_id, period_prices.period_start, period_prices.meter_id, period_prices.dimension
),

-- a part-month period: an allowance of an additive quantity (sum, unit-hours, unit-months) is
-- prorated by days; a level (peak or average: devices, GiB stored) keeps its allowance and its
-- charge is prorated instead (below). A pool is shared by its price rows, used up in the order
-- of the rows in prices.csv.
pooled as (
    select
        *,
        case when aggregation in ('max', 'avg')
                then max(to_nano(included_quantity) * divisor) over pool
            else div_half_up(max(to_nano(included_quantity) * divisor) over pool * period_days, month_days)
        end as pool_nano,
        coalesce(
            sum(quantity_nano) over (pool rows between unbounded preceding and 1 preceding),
            0
        ) as pool_used_before_nano
    from matched
    window pool as (
        partition by customer_id, period_start, coalesce(included_pool, meter_id || '/' || dimension)
        order by price_line
    )
),

billable as (
    select
        *,
        greatest(0, least(quantity_nano, pool_nano - pool_used_before_nano))::hugeint as included_nano,
        (quantity_nano - greatest(0, least(quantity_nano, pool_nano - pool_used_before_nano)))::hugeint
            as billable_nano
    from pooled
),

-- graduated: each tier prices the units that fall in it; volume: the tier the total falls in
-- prices every unit. Tier bounds are in billing units, applied to the quantity after the allowance.
tier_bounds as (
    select
        tiers.*,
        coalesce(lag(tiers.up_to) over (
            partition by tiers.plan_id, tiers.plan_version, tiers.meter_id, tiers.dimension order by tiers.tier
        ), 0) as lower_bound
    from tiers
),

tiered as (
    select
        billable.customer_id,
        billable.period_start,
        billable.meter_id,
        billable.dimension,
        -- exact numerator over the denominator divisor x 1e18 (one rounding per line, below)
        sum(
            case
                when billable.pricing = 'graduated'
                    then
                        greatest(
                            0, least(billable.billable_nano, coalesce(to_nano(tier_bounds.up_to) * billable.divisor, billable.billable_nano))
                            - to_nano(tier_bounds.lower_bound) * billable.divisor
                        )
                        * to_nano(tier_bounds.unit_price) * billable.minor_per_major
                        + case
                            when billable.billable_nano > to_nano(tier_bounds.lower_bound) * billable.divisor
                                then to_nano(tier_bounds.flat_fee) * billable.minor_per_major * billable.divisor * 1000000000
                            else 0
                        end
                when billable.billable_nano > to_nano(tier_bounds.lower_bound) * billable.divisor
                    and (tier_bounds.up_to is null or billable.billable_nano <= to_nano(tier_bounds.up_to) * billable.divisor)
                    then billable.billable_nano * to_nano(tier_bounds.unit_price) * billable.minor_per_major
                        + to_nano(tier_bounds.flat_fee) * billable.minor_per_major * billable.divisor * 1000000000
                else 0
            end
        )::hugeint as numerator,
        string_agg(
            case
                when billable.pricing = 'graduated'
                    and billable.billable_nano > to_nano(tier_bounds.lower_bound) * billable.divisor
                    then fmt_decimal(from_nano(div_half_up(
                            least(billable.billable_nano, coalesce(to_nano(tier_bounds.up_to) * billable.divisor, billable.billable_nano))
                            - to_nano(tier_bounds.lower_bound) * billable.divisor,
                            billable.divisor
                        ))) || ' x ' || fmt_decimal(tier_bounds.unit_price)
                when billable.pricing = 'volume'
                    and billable.billable_nano > to_nano(tier_bounds.lower_bound) * billable.divisor
                    and (tier_bounds.up_to is null or billable.billable_nano <= to_nano(tier_bounds.up_to) * billable.divisor)
                    then fmt_decimal(from_nano(div_half_up(billable.billable_nano, billable.divisor)))
                        || ' x ' || fmt_decimal(tier_bounds.unit_price) || ' (tier ' || tier_bounds.tier || ')'
            end,
            ' + ' order by tier_bounds.tier
        ) as tier_formula
    from billable
    inner join tier_bounds
        on billable.plan_id = tier_bounds.plan_id
        and billable.plan_version = tier_bounds.plan_version
        and billable.meter_id = tier_bounds.meter_id
        and billable.dimension = tier_bounds.dimension
    where billable.pricing in ('graduated', 'volume')
    group by billable.customer_id, billable.period_start, billable.meter_id, billable.dimension
),

amounts as (
    select
        billable.*,
        case when billable.pricing = 'package' then
                case billable.package_rounding
                    when 'up' then ceil_div(billable.billable_nano, billable.package_size::hugeint * billable.divisor * 1000000000)
                    when 'down' then billable.billable_nano // (billable.package_size::hugeint * billable.divisor * 1000000000)
                    else div_half_up(billable.billable_nano, billable.package_size::hugeint * billable.divisor * 1000000000)
                end
        end as packages,
        tiered.numerator as tier_numerator,
        tiered.tier_formula
    from billable
    left join tiered
        on billable.customer_id = tiered.customer_id
        and billable.period_start = tiered.period_start
        and billable.meter_id = tiered.meter_id
        and billable.dimension = tiered.dimension
),

-- each amount as an exact fraction numerator / denominator of minor units
fractions as (
    select
        *,
        case pricing
            when 'package' then packages * to_nano(unit_price) * minor_per_major
            when 'per_unit' then billable_nano * to_nano(unit_price) * minor_per_major
            else coalesce(tier_numerator, 0)
        end::hugeint as numerator,
        case pricing
            when 'package' then 1000000000::hugeint
            else divisor::hugeint * 1000000000 * 1000000000
        end as denominator,
        case when aggregation in ('max', 'avg') then period_days else month_days end as proration_days
    from amounts
),

final as (
    select
        $start_date::date as month,
        customer_id,
        period_start,
        period_end,
        plan_id,
        plan_version,
        meter_id,
        dimension,
        currency,
        aggregation,
        pricing,
        billing_unit
        || case aggregation when 'unit_hours' then '-hour' when 'unit_months' then '-month' else '' end
            as unit,
        from_nano(div_half_up(quantity_nano, divisor)) as quantity,
        from_nano(div_half_up(included_nano, divisor)) as included_quantity,
        from_nano(div_half_up(billable_nano, divisor)) as billable_quantity,
        unit_price,
        package_size,
        packages::bigint as packages,
        tier_formula,
        -- rule 7: one rounding, half-up to the minor unit, of the exact amount
        div_half_up(numerator * proration_days, denominator * month_days)::bigint as amount_minor,
        price_description
    from fractions
)

select * from final
